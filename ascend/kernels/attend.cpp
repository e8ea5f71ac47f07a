// Attention over a paged cache (SPEC §7.4, vector cores): the device's engine path, with the
// semantics of cuda/attend.cu. The host cuts the call into tiles (EkAttendTile: ≤ 16 query rows
// of one sequence and cache head, within one segment of a planned sequence, visible keys worked
// out from the lengths); cores take tiles round-robin and each runs all of its tile's keys (no
// split-K here: `splits` is 1), so it writes out and lse itself.
//
// Keys stream through in runs that never leave a page: a planned unit's listed blocks (a block
// lies within one page: pages hold whole blocks, validated) and then the tile's own range
// own_from .. own_end, cut at page ends and at DECODE-sized tiles of ATTEND_KEYS rows. A run is
// one strided DataCopyPad per pool (rows slot_stride apart, as `npu_fused_infer_attention_score`
// reads a block_table). The bottom-right causal rule masks a suffix of each run: row r at
// position p sees the run's first p − pos0 + 1 keys, so its online-softmax step takes that prefix
// (rows that see none skip the run). UB plan: the decode kernel's (32-key K and V tiles, 16 rows).

#include "kernel_operator.h"
#include "entropy_params.h"
#include "common.h"

using namespace AscendC;

namespace {

constexpr uint32_t ATTEND_KEYS = 32;
constexpr uint32_t ATTEND_MAX_ROWS = 16;

template <typename T> class AttendKernel {
public:
    __aicore__ inline void Run(const EkAttendParams& p) {
        p_ = p;
        d_ = p.q.shape[3];
        dpt_ = PaddedElems<T>(d_);
        dpf_ = PaddedElems<float>(d_);
        qGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.q.ptr));
        kGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.k_pool));
        vGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.v_pool));
        oGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.out.ptr));
        lseGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(p.lse));
        tableGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.block_table));
        tilesGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.tiles));
        offsetsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.offsets));
        countsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.counts));
        indicesGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.indices));
        const uint32_t tile = ATTEND_KEYS * dpt_ * sizeof(T);
        pipe_.InitBuffer(kIn_, 1, tile);
        pipe_.InitBuffer(vIn_, 1, tile);
        pipe_.InitBuffer(rowIn_, 1, dpt_ * sizeof(T));
        pipe_.InitBuffer(rowOut_, 1, dpt_ * sizeof(T));
        pipe_.InitBuffer(lseOut_, 1, ONE_BLK_SIZE);
        pipe_.InitBuffer(q_, ATTEND_MAX_ROWS * dpf_ * sizeof(float));
        pipe_.InitBuffer(o_, ATTEND_MAX_ROWS * dpf_ * sizeof(float));
        if (!SameType<T, float>::value) {
            pipe_.InitBuffer(kf_, ATTEND_KEYS * dpt_ * sizeof(float));
            pipe_.InitBuffer(vf_, ATTEND_KEYS * dpt_ * sizeof(float));
        }
        pipe_.InitBuffer(scores_, ATTEND_MAX_ROWS * ATTEND_KEYS * sizeof(float));
        pipe_.InitBuffer(tmp_, ATTEND_KEYS * dpt_ * sizeof(float));
        pipe_.InitBuffer(part_, ATTEND_KEYS * FLOATS_PER_BLOCK * sizeof(float));
        pipe_.InitBuffer(red_, ONE_BLK_SIZE);
        pipe_.InitBuffer(work_, ONE_REPEAT_BYTES);
        for (uint32_t it = GetBlockIdx(); it < (uint32_t)p.tiles_count; it += GetBlockNum()) Tile(it);
    }

private:
    // Field f of tile `it` (EkAttendTile: twelve uint32 in header order).
    __aicore__ inline uint32_t Field(uint32_t it, uint32_t f) { return tilesGm_.GetValue(it * TILE_FIELDS + f); }

    // Where row r of the tile lives in q / out: (token, query head) as strides of `x`.
    __aicore__ inline int64_t RowOffset(const EkTensor& x, uint32_t r) {
        const int64_t token = token_ + r / qHeads_;
        const int64_t hq = (int64_t)head_ * p_.group + qHead_ + r % qHeads_;
        if (p_.batched_rows > 0) return (token / p_.batched_rows) * x.stride[0] + (token % p_.batched_rows) * x.stride[1] + hq * x.stride[2];
        return token * x.stride[1] + hq * x.stride[2];
    }

    __aicore__ inline void Tile(uint32_t it) {
        seq_ = Field(it, 0);
        head_ = Field(it, 1);
        token_ = Field(it, 2);
        const uint32_t tokens = Field(it, 3);
        qHead_ = Field(it, 4);
        qHeads_ = Field(it, 5);
        pos_ = Field(it, 6);
        causal_ = Field(it, 7) != 0;
        const uint32_t ownFrom = Field(it, 8), ownEnd = Field(it, 9), unit = Field(it, 10), bs = Field(it, 11);
        rows_ = tokens * qHeads_;
        if (rows_ > ATTEND_MAX_ROWS) return;  // never sent (src/ascend/ops.rs cuts ≤ 16 rows): m_/l_ hold 16
        const float scale = p_.scale_log2 * LN2;  // natural-log scale for Exp
        LocalTensor<float> q = q_.Get<float>(), o = o_.Get<float>();
        for (uint32_t r = 0; r < rows_; r++) {
            LoadScaledRow<T>(rowIn_, q[r * dpf_], qGm_[RowOffset(p_.q, r)], d_, dpf_, scale);
        }
        Duplicate(o, 0.0f, (int32_t)(rows_ * dpf_));
        VecBarrier();
        for (uint32_t r = 0; r < rows_; r++) {
            m_[r] = NegInf();
            l_[r] = 0.0f;
        }
        // The unit's listed blocks (all before own_from: visible to every row), then the own range.
        if (unit != EK_ATTEND_NO_UNIT) {
            const uint32_t first = offsetsGm_.GetValue(unit), listed = countsGm_.GetValue(unit);
            for (uint32_t b = 0; b < listed; b++) {
                const uint32_t start = indicesGm_.GetValue(first + b) * bs;
                for (uint32_t k = 0; k < bs; k += ATTEND_KEYS) KeyRun(start + k, bs - k < ATTEND_KEYS ? bs - k : ATTEND_KEYS, false);
            }
        }
        for (uint32_t k = ownFrom; k < ownEnd;) {
            const uint32_t pageLeft = p_.page_size - k % p_.page_size;
            uint32_t n = ownEnd - k < ATTEND_KEYS ? ownEnd - k : ATTEND_KEYS;
            n = n < pageLeft ? n : pageLeft;
            KeyRun(k, n, causal_);
            k += n;
        }
        WriteRows();
    }

    // Keys pos0 .. pos0 + n (within one page) for every row of the tile.
    __aicore__ inline void KeyRun(uint32_t pos0, uint32_t n, bool masked) {
        const uint32_t page = tableGm_.GetValue((int64_t)seq_ * p_.table_width + pos0 / p_.page_size);
        const int64_t at = (int64_t)page * p_.page_stride + (int64_t)(pos0 % p_.page_size) * p_.slot_stride + (int64_t)head_ * p_.head_stride;
        LocalTensor<T> kt, vt;
        LocalTensor<float> kf = LoadRows<T>(kIn_, WideBuffer<T>(kf_), kGm_[at], n, d_, p_.slot_stride, kt);
        LocalTensor<float> vf = LoadRows<T>(vIn_, WideBuffer<T>(vf_), vGm_[at], n, d_, p_.slot_stride, vt);
        LocalTensor<float> o = o_.Get<float>(), q = q_.Get<float>(), sc = scores_.Get<float>();
        const RowTileScratch scratch{tmp_.Get<float>(), part_.Get<float>(), red_.Get<float>(), work_.Get<float>()};
        for (uint32_t r = 0; r < rows_; r++) {
            uint32_t visible = n;
            if (masked) {
                const uint32_t qpos = pos_ + r / qHeads_;
                visible = qpos < pos0 ? 0 : (qpos - pos0 + 1 < n ? qpos - pos0 + 1 : n);
            }
            if (visible > 0) RowTileStep(o[r * dpf_], dpf_, sc[r * ATTEND_KEYS], q[r * dpf_], kf, vf, visible, d_, dpt_, scratch, m_[r], l_[r]);
        }
        kIn_.FreeTensor(kt);
        vIn_.FreeTensor(vt);
    }

    // out = O / l per row; lse = m + ln l (natural log).
    __aicore__ inline void WriteRows() {
        LocalTensor<float> o = o_.Get<float>();
        for (uint32_t r = 0; r < rows_; r++) {
            StoreScaledRow<T>(rowOut_, oGm_[RowOffset(p_.out, r)], o[r * dpf_], d_, dpf_, 1.0f / l_[r]);
            if (p_.lse) {
                LocalTensor<float> v = lseOut_.template AllocTensor<float>();
                Duplicate(v, l_[r], (int32_t)FLOATS_PER_BLOCK);
                VecBarrier();
                Ln(v, v, (int32_t)FLOATS_PER_BLOCK);
                VecBarrier();
                Adds(v, v, m_[r], (int32_t)FLOATS_PER_BLOCK);
                VecBarrier();
                lseOut_.EnQue(v);
                v = lseOut_.template DeQue<float>();
                const int64_t token = token_ + r / qHeads_;
                const int64_t hq = (int64_t)head_ * p_.group + qHead_ + r % qHeads_;
                const int64_t hqs = p_.q.shape[2];
                const int64_t li = p_.batched_rows > 0
                                       ? ((token / p_.batched_rows) * hqs + hq) * p_.batched_rows + token % p_.batched_rows
                                       : token * hqs + hq;
                DataCopyPad(lseGm_[li], v, DataCopyExtParams(1, sizeof(float), 0, 0, 0));
                lseOut_.FreeTensor(v);
            }
        }
    }

    static constexpr uint32_t TILE_FIELDS = sizeof(EkAttendTile) / sizeof(uint32_t);
    EkAttendParams p_;
    uint32_t d_ = 0, dpt_ = 0, dpf_ = 0, rows_ = 0;
    uint32_t seq_ = 0, head_ = 0, token_ = 0, qHead_ = 0, qHeads_ = 1, pos_ = 0;
    bool causal_ = true;
    float m_[ATTEND_MAX_ROWS], l_[ATTEND_MAX_ROWS];
    TPipe pipe_;
    TQue<TPosition::VECIN, 1> kIn_, vIn_, rowIn_;
    TQue<TPosition::VECOUT, 1> rowOut_, lseOut_;
    TBuf<TPosition::VECCALC> q_, o_, kf_, vf_, scores_, tmp_, part_, red_, work_;
    GlobalTensor<T> qGm_, kGm_, vGm_, oGm_;
    GlobalTensor<float> lseGm_;
    GlobalTensor<uint32_t> tableGm_, tilesGm_, offsetsGm_, countsGm_, indicesGm_;
};

}  // namespace

namespace {

// Append (SPEC §7.4) into a paged cache: item (token t of the THD batch, cache head h) copies K
// and V row t of kv head h / (Hc / Hkv) to entry lens[i·Hc + h] + (t − cu_q[i]) of sequence i's
// pages, i the sequence whose tokens cu_q[i] .. cu_q[i+1] hold t; cores take items round-robin.
// Items write disjoint rows (DataCopyPad writes exactly the row's bytes); the host checked that no
// page is written by two sequences and advances the lengths after the launch.
template <typename T> class AppendKernel {
public:
    __aicore__ inline void Run(const EkAppendParams& p) {
        p_ = p;
        d_ = p.k_new.shape[3];
        cuGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.cu_q));
        lensGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.lens));
        tableGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.block_table));
        pipe_.InitBuffer(rows_, 2, PaddedElems<T>(d_) * sizeof(T));
        const uint32_t items = (uint32_t)p.k_new.shape[1] * p.cache_heads;
        for (uint32_t it = GetBlockIdx(); it < items; it += GetBlockNum()) Item(it / p.cache_heads, it % p.cache_heads);
    }

private:
    __aicore__ inline void Move(uint64_t src_ptr, int64_t src, uint64_t dst_ptr, int64_t dst) {
        GlobalTensor<T> s, d;
        s.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(src_ptr));
        d.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(dst_ptr));
        MoveRow(rows_, s[src], d[dst], d_);
    }

    __aicore__ inline void Item(uint32_t t, uint32_t h) {
        uint32_t i = 0;  // the sequence of token t (the last whose first token is at or before t)
        while (i + 1 < (uint32_t)p_.sequences && cuGm_.GetValue(i + 1) <= t) i++;
        const uint32_t pos = lensGm_.GetValue(i * p_.cache_heads + h) + (t - cuGm_.GetValue(i));
        const int64_t page = tableGm_.GetValue((int64_t)i * p_.table_width + pos / (uint32_t)p_.page_size);
        const int64_t dst = page * p_.page_stride + (int64_t)(pos % (uint32_t)p_.page_size) * p_.slot_stride + (int64_t)h * p_.head_stride;
        const uint32_t hk = h / (p_.cache_heads / p_.k_new.shape[2]);
        Move(p_.k_new.ptr, t * p_.k_new.stride[1] + hk * p_.k_new.stride[2], p_.k_pool, dst);
        Move(p_.v_new.ptr, t * p_.v_new.stride[1] + hk * p_.v_new.stride[2], p_.v_pool, dst);
    }

    EkAppendParams p_;
    uint32_t d_ = 0;
    TPipe pipe_;
    TQueBind<TPosition::VECIN, TPosition::VECOUT, 2> rows_;
    GlobalTensor<uint32_t> cuGm_, lensGm_, tableGm_;
};

}  // namespace

extern "C" __global__ __aicore__ void ek_attend(GM_ADDR params) { Dispatch<AttendKernel>(ReadParams<EkAttendParams>(params)); }
extern "C" __global__ __aicore__ void ek_append(GM_ADDR params) { Dispatch<AppendKernel>(ReadParams<EkAppendParams>(params)); }

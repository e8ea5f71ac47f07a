// Planning, representatives stage (SPEC §2.1) on vector cores: element-wise max and min over
// each segment's queries (every query head) and each block's keys (every kv head), the pass that
// reads all of Q and K. Max and min are exact in any precision, so the f32 results equal the
// reference's; the decisions that follow (logits, softmax, entropy, budgets, ranking) need f64
// to agree with the reference to the last tie, which A2's vector units do not have: the host
// finishes them (src/ascend/ops.rs → cpu::plan::plan_from_representatives).
//
// Item = (b, segment) over the query heads, then (b, block) over the kv heads; cores take items
// round-robin. A chunk (SPEC §7.2; one sequence, batch 1) covers segments seg_first .. seg_end —
// its queries rows of a THD chunk (position t at row q_token0 + t − q_pos0), qrep laid out per
// planned segment — and the blocks before its last segment, read through the block-table row
// when `block_table` is set. Per item, heads are processed in chunks of at most PLAN_CHUNK_ELEMS f32 lanes:
//   token rows of the chunk in T     2 × 8192 × 2 B  = 32 KiB (double-buffered)
//   widened to f32                       8192 × 4 B  = 32 KiB
//   running max and min                2 × 8192 × 4 B = 64 KiB          (128 of 192 KiB)
// Outputs (f32): qsum field = qrep [B, segments, Hq, 2, D]; krep field = [B, blocks, Hkv, 2, D].
// Expected utilisation: bandwidth-bound (each element of Q and K read once, 2 vector ops each).

#include "kernel_operator.h"
#include "entropy_params.h"
#include "common.h"

using namespace AscendC;

namespace {

constexpr uint32_t PLAN_CHUNK_ELEMS = 8192;  // f32 lanes of one head chunk (heads × padded D)

__aicore__ inline uint32_t Least(uint32_t a, uint32_t b) { return a < b ? a : b; }

__aicore__ inline float PosInf() {
    union {
        uint32_t u;
        float f;
    } v;
    v.u = 0x7f800000u;
    return v.f;
}

template <typename T> class PlanRepsKernel {
public:
    __aicore__ inline void Run(const EkPlanParams& p) {
        p_ = p;
        d_ = p.head_dim;
        dpt_ = PaddedElems<T>(d_);
        chunk_ = PLAN_CHUNK_ELEMS / dpt_;
        qGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.q.ptr));
        kGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.k.ptr));
        qrepGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(p.qsum));
        krepGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(p.krep));
        pipe_.InitBuffer(in_, 2, chunk_ * dpt_ * sizeof(T));
        if (!SameType<T, float>::value) pipe_.InitBuffer(wide_, chunk_ * dpt_ * sizeof(float));
        pipe_.InitBuffer(mx_, chunk_ * dpt_ * sizeof(float));
        pipe_.InitBuffer(mn_, chunk_ * dpt_ * sizeof(float));
        pipe_.InitBuffer(out_, 1, 2 * dpt_ * sizeof(float));
        if (p.block_table) tableGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.block_table));
        // Blocks some planned segment may select: those before the last one.
        const uint32_t planned = p.seg_end - p.seg_first;
        const uint32_t bps = p.segment_size / p.block_size;
        const uint32_t blocks = Least(p.blocks, (p.seg_end - 1) * bps);
        const uint32_t qitems = p.batch * planned, kitems = p.batch * blocks;
        for (uint32_t it = GetBlockIdx(); it < qitems + kitems; it += GetBlockNum()) {
            if (it < qitems) {
                const uint32_t b = it / planned, s = p.seg_first + it % planned;
                const uint32_t t0 = s * p.segment_size, t1 = Least(p.seq_len, t0 + p.segment_size);
                Item(true, b, t0, t1, p.q_heads, qrepGm_, ((uint64_t)b * planned + s - p.seg_first) * p.q_heads);
            } else {
                const uint32_t b = (it - qitems) / blocks, j = (it - qitems) % blocks;
                Item(false, b, j * p.block_size, (j + 1) * p.block_size, p.kv_heads, krepGm_,
                     ((uint64_t)b * p.blocks + j) * p.kv_heads);
            }
        }
    }

private:
    // Element offset of token t, head h of the queries (`query`) or the keys, and the stride
    // between heads.
    __aicore__ inline int64_t Row(bool query, uint32_t b, uint32_t t, uint32_t h) {
        if (query) return b * p_.q.stride[0] + (int64_t)(p_.q_token0 + (int32_t)t - p_.q_pos0) * p_.q.stride[1] + h * p_.q.stride[2];
        if (!p_.block_table) return b * p_.k.stride[0] + t * p_.k.stride[1] + h * p_.k.stride[2];
        const int64_t page = tableGm_.GetValue(t / (uint32_t)p_.page_size);
        return page * p_.page_stride + (int64_t)(t % (uint32_t)p_.page_size) * p_.slot_stride + (int64_t)h * p_.head_stride;
    }
    __aicore__ inline int64_t HeadStride(bool query) {
        return query ? p_.q.stride[2] : (p_.block_table ? p_.head_stride : p_.k.stride[2]);
    }

    // Max and min over tokens [t0, t1) of every head of the queries or keys, written as `heads`
    // (max, min) row pairs from row `first` of `dst`.
    __aicore__ inline void Item(bool query, uint32_t b, uint32_t t0, uint32_t t1, uint32_t heads,
                                const GlobalTensor<float>& dst, uint64_t first) {
        const GlobalTensor<T>& src = query ? qGm_ : kGm_;
        const int64_t hs = HeadStride(query);
        for (uint32_t h0 = 0; h0 < heads; h0 += chunk_) {
            const uint32_t nh = Least(chunk_, heads - h0), lanes = nh * dpt_;
            LocalTensor<float> mx = mx_.Get<float>(), mn = mn_.Get<float>();
            Duplicate(mx, NegInf(), (int32_t)lanes);
            VecBarrier();
            Duplicate(mn, PosInf(), (int32_t)lanes);
            VecBarrier();
            for (uint32_t t = t0; t < t1; t++) {
                LocalTensor<T> held = in_.template AllocTensor<T>();
                // The chunk's heads of token t: one row per head, padded to the 32-byte grid.
                const int64_t off = Row(query, b, t, h0);
                DataCopyExtParams cp(nh, d_ * sizeof(T), (uint32_t)((hs - d_) * sizeof(T)), 0, 0);
                DataCopyPad(held, src[off], cp, DataCopyPadExtParams<T>(true, 0, 0, T(0.0f)));
                in_.EnQue(held);
                held = in_.template DeQue<T>();
                LocalTensor<float> row;
                if constexpr (SameType<T, float>::value) {
                    row = held;
                } else {
                    row = wide_.Get<float>();
                    Cast(row, held, RoundMode::CAST_NONE, lanes);
                    VecBarrier();
                }
                Max(mx, mx, row, (int32_t)lanes);
                VecBarrier();
                Min(mn, mn, row, (int32_t)lanes);
                VecBarrier();
                in_.FreeTensor(held);
            }
            for (uint32_t h = 0; h < nh; h++) {
                LocalTensor<float> o = out_.AllocTensor<float>();
                DataCopy(o, mx[h * dpt_], dpt_);
                VecBarrier();
                DataCopy(o[dpt_], mn[h * dpt_], dpt_);
                VecBarrier();
                out_.EnQue(o);
                o = out_.DeQue<float>();
                // Two rows of D floats: (max, min) of head h0 + h.
                const uint32_t gap = (dpt_ - PaddedElems<float>(d_)) * sizeof(float) / ONE_BLK_SIZE;
                DataCopyPad(dst[(first + h0 + h) * 2 * d_], o, DataCopyExtParams(2, d_ * sizeof(float), gap, 0, 0));
                out_.FreeTensor(o);
            }
        }
    }

    EkPlanParams p_;
    uint32_t d_ = 0, dpt_ = 0, chunk_ = 0;
    TPipe pipe_;
    TQue<TPosition::VECIN, 2> in_;
    TQue<TPosition::VECOUT, 1> out_;
    TBuf<TPosition::VECCALC> wide_, mx_, mn_;
    GlobalTensor<T> qGm_, kGm_;
    GlobalTensor<uint32_t> tableGm_;
    GlobalTensor<float> qrepGm_, krepGm_;
};

}  // namespace

extern "C" __global__ __aicore__ void ek_plan_reps(GM_ADDR params) { Dispatch<PlanRepsKernel>(ReadParams<EkPlanParams>(params)); }

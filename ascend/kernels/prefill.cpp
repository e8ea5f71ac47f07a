// Fused block-sparse FlashAttention prefill (SPEC §3) as a mixed kernel: each AI core's cube
// unit (AIC) computes S = Q·Kᵀ and O_j = P·V on L0, its two vector units (AIV) run the online
// softmax over half of the rows each; tiles travel through a per-core GM workspace, handed over
// with cross-core flags.
//
// Work item = (b, kv head h, segment s, query tile): the tile's tokens × the G query heads of the
// group stacked into the M rows (row r = token offset · G + g), so K/V tiles are read once per
// group. Keys form a virtual list: the unit's selected blocks (ascending, all before the
// segment), then the segment's own keys up to the tile's last token; a dense unit's list is
// 0..last token. Row r sees a prefix of that list (blocks + own keys ≤ its token), so masking is
// a per-row visible count. Tiles of PREFILL_KEYS virtual keys are gathered run by run (a block,
// or a stretch of own keys) straight into L1; a short last tile is padded with copies of a real
// key (finite data, masked to P = 0).
//
// Per key tile j (two tiles in flight, workspace slots j % 2):
//                AIC                                           AIV k (rows of its half)
//   K_{j+1} → L1 → L0B; S_{j+1} = Q·Kᵀ → S_ws   ──FLAG_S──▶   S_j rows: scale, mask, m, l, P = e^(S−m)
//   V_j → L1 → L0B (transposed fractals)                       P_j → P_ws (T), α_j = e^(m_old − m_new)
//   P_ws → L1 → L0A; O_j = P·V → L0C → O_ws     ◀──FLAG_P──
//                                               ──FLAG_O──▶   (after softmax j+1) O = α_j·O + O_j
// so the cube computes S_{j+1} and loads V_j while the vector units run tile j's softmax.
// End of item (AIV): O / l → out (T); lse = m + ln l.
//
// Tile plan (PREFILL_ROWS = 64, PREFILL_KEYS = 64, D ≤ 256, T = half/bf16):
//   L1   Q 64×256×2 = 32 KiB, K 32 KiB, V 32 KiB, P 64×64×2 = 8 KiB          (104 of 512 KiB)
//   L0A  Q 32 KiB resident for the item + P 8 KiB                              ( 40 of  64 KiB)
//   L0B  Kᵀ 32 KiB + V 32 KiB                                                  ( 64 of  64 KiB)
//   L0C  S 64×64×4 = 16 KiB + O 64×256×4 = 64 KiB                              ( 80 of 128 KiB)
//   UB (each AIV, 32 rows) S 8 KiB, P 4 KiB + 8 KiB, O accumulator 32 KiB, O tile 32 KiB,
//        output rows 16 KiB, lse blocks 1 KiB, row statistics 3 KiB         (~104 of 192 KiB)
//   GM workspace per core: 2 slots × (S 16 KiB + P 8 KiB + O 64 KiB) = 176 KiB
// Expected utilisation: the cube does 4·M·KT·D FLOPs per tile at full fractal occupancy when
// M = 64 (G·tile_tokens); with S_{j+1} overlapping tile j's softmax the cube waits only when the
// two AIVs' softmax of a tile (≈ 64 rows × 64 keys of exp, max, sum: ~15 whole-tile vector
// instructions per AIV, plus one masking Duplicate per row on the diagonal) outlasts S_{j+1} + the V_j
// load; the GM round trips of S/P/O (~88 KiB per tile) make the kernel L2-bandwidth-sensitive at
// D 256. Not measured: no NPU.

#include "kernel_operator.h"
#include "entropy_params.h"
#include "common.h"
#include "prefill_items.h"
#include "cube_common.h"

using namespace AscendC;
using namespace ekprefill;
using namespace ekcube;

namespace {

constexpr uint32_t PREFILL_ROWS = 64;   // M rows per item (query tokens × group heads)
constexpr uint32_t PREFILL_KEYS = 64;   // keys per tile
constexpr uint32_t PREFILL_MAX_D = 256;
constexpr int32_t FLAG_S = 1, FLAG_P = 2, FLAG_O = 3;
// GM workspace per core: two slots (tiles j and j + 1 in flight), each S (f32), P (T), O (f32).
constexpr uint32_t WS_S = PREFILL_ROWS * PREFILL_KEYS * 4;
constexpr uint32_t WS_P = PREFILL_ROWS * PREFILL_KEYS * 2;
constexpr uint32_t WS_O = PREFILL_ROWS * PREFILL_MAX_D * 4;
constexpr uint32_t WS_SLOT = WS_S + WS_P + WS_O;
constexpr uint32_t WS_SLOTS = 2;

// Views of slot `slot` of a core's workspace.
template <typename T> struct Workspace {
    GlobalTensor<float> s;
    GlobalTensor<T> p;
    GlobalTensor<float> o;
    __aicore__ inline void Init(uint64_t base) {
        s.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(base));
        p.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(base + WS_S));
        o.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(base + WS_S + WS_P));
    }
    __aicore__ inline GlobalTensor<float> S(uint32_t slot) const { return s[slot * WS_SLOT / sizeof(float)]; }
    __aicore__ inline GlobalTensor<T> P(uint32_t slot) const { return p[slot * WS_SLOT / sizeof(T)]; }
    __aicore__ inline GlobalTensor<float> O(uint32_t slot) const { return o[slot * WS_SLOT / sizeof(float)]; }
};


// ------------------------------------------------------------------------------------------------
// Cube side.

template <typename T> class PrefillCube {
public:
    __aicore__ inline void Run(const EkPrefillParams& p) {
        p_ = p;
        d_ = p.q.shape[3];
        dp_ = Up16(d_);
        qGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.q.ptr));
        kGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.k.ptr));
        vGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.v.ptr));
        offsetsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.offsets));
        countsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.counts));
        indicesGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.indices));
        ws_.Init(p.workspace + (uint64_t)GetBlockIdx() * WS_SLOTS * WS_SLOT);
        pipe_.InitBuffer(qL1_, PREFILL_ROWS * PREFILL_MAX_D * sizeof(T));
        pipe_.InitBuffer(kL1_, PREFILL_KEYS * PREFILL_MAX_D * sizeof(T));
        pipe_.InitBuffer(vL1_, PREFILL_KEYS * PREFILL_MAX_D * sizeof(T));
        pipe_.InitBuffer(pL1_, PREFILL_ROWS * PREFILL_KEYS * sizeof(T));
        pipe_.InitBuffer(qL0_, PREFILL_ROWS * PREFILL_MAX_D * sizeof(T));
        pipe_.InitBuffer(pL0_, PREFILL_ROWS * PREFILL_KEYS * sizeof(T));
        pipe_.InitBuffer(kL0_, PREFILL_KEYS * PREFILL_MAX_D * sizeof(T));
        pipe_.InitBuffer(vL0_, PREFILL_KEYS * PREFILL_MAX_D * sizeof(T));
        pipe_.InitBuffer(sL0_, PREFILL_ROWS * PREFILL_KEYS * sizeof(float));
        pipe_.InitBuffer(oL0_, PREFILL_ROWS * PREFILL_MAX_D * sizeof(float));
        // Each buffer's write-after-read hand-off (cube_common.h), one event id per buffer.
        qL1Free_.Start(0);
        kL1Free_.Start(1);
        vL1Free_.Start(2);
        pL1Free_.Start(3);
        qL0Free_.Start(0);
        kL0Free_.Start(1);
        vL0Free_.Start(2);
        pL0Free_.Start(3);
        sL0Free_.Start(0);
        oL0Free_.Start(1);
        const uint32_t items = ItemCount(p);
        for (uint32_t it = GetBlockIdx(); it < items; it += GetBlockNum()) {
            Item x;
            if (MakeItem(p_, it, x, offsetsGm_, countsGm_)) Work(x);
        }
        qL1Free_.Drain();
        kL1Free_.Drain();
        vL1Free_.Drain();
        pL1Free_.Drain();
        qL0Free_.Drain();
        kL0Free_.Drain();
        vL0Free_.Drain();
        pL0Free_.Drain();
        sL0Free_.Drain();
        oL0Free_.Drain();
    }

private:
    // Copies `n` consecutive keys from `pos` (of K or V) into L1 rows [row, row + n) of a tile.
    __aicore__ inline void CopyKeys(const GlobalTensor<T>& src, const EkTensor& t, const Item& x, uint32_t pos, uint32_t n,
                                    uint32_t row, const LocalTensor<T>& dst) {
        const int64_t off = x.b * t.stride[0] + pos * t.stride[1] + x.h * t.stride[2];
        DataCopy(dst[row * FRACTAL], src[off], Nd2NzParams(1, n, d_, 0, t.stride[1], PREFILL_KEYS, 1, 0));
    }

    __aicore__ inline uint32_t Position(const Item& x, uint32_t v) { return KeyPosition(x, v, p_.block_size, indicesGm_); }

    // Gathers virtual keys [v0, v0 + n) into a PREFILL_KEYS-row L1 tile, run by run, padding the
    // rest with copies of the first key.
    __aicore__ inline void Gather(const GlobalTensor<T>& src, const EkTensor& t, const Item& x, uint32_t v0, uint32_t n,
                                  const LocalTensor<T>& dst) {
        const uint32_t in_blocks = x.blocks * p_.block_size;
        uint32_t row = 0;
        while (row < n) {
            const uint32_t v = v0 + row;
            // A run ends at the end of a block (block part) or of the list (own part).
            const uint32_t run = v < in_blocks ? Min(p_.block_size - v % p_.block_size, Min(in_blocks - v, n - row)) : n - row;
            CopyKeys(src, t, x, Position(x, v), run, row, dst);
            row += run;
        }
        if (n < PREFILL_KEYS) {
            const int64_t off = x.b * t.stride[0] + Position(x, v0) * t.stride[1] + x.h * t.stride[2];
            DataCopy(dst[n * FRACTAL], src[off], Nd2NzParams(PREFILL_KEYS - n, 1, d_, 0, t.stride[1], PREFILL_KEYS, 1, FRACTAL));
        }
    }


    __aicore__ inline void Work(const Item& x) {
        const uint32_t mpad = Up16(x.rows);
        LocalTensor<T> qL1 = qL1_.Get<T>(), vL1 = vL1_.Get<T>(), pL1 = pL1_.Get<T>();
        LocalTensor<T> qL0 = qL0_.Get<T>(), pL0 = pL0_.Get<T>(), vL0 = vL0_.Get<T>();
        LocalTensor<float> oL0 = oL0_.Get<float>();
        // Q: per token, the group's G heads are G rows; tokens follow at G rows each.
        const int64_t qoff = x.b * p_.q.stride[0] + x.t0 * p_.q.stride[1] + x.h * p_.group * p_.q.stride[2];
        qL1Free_.BeforeWrite();
        DataCopy(qL1, qGm_[qoff], Nd2NzParams(x.tokens, p_.group, d_, p_.q.stride[1], p_.q.stride[2], mpad, 1, p_.group * FRACTAL));
        CopiesToL1Done();
        qL0Free_.BeforeWrite();  // the previous item's last Mmad read Q
        ToL0A(qL0, qL1, mpad, dp_);
        qL1Free_.AfterRead();
        // Two tiles in flight: S_{j+1} is computed (and V_j loaded) while the vector units run
        // the softmax of tile j; P·V of tile j waits for its P.
        const uint32_t tiles = (x.keys + PREFILL_KEYS - 1) / PREFILL_KEYS;
        Scores(x, 0, mpad);
        for (uint32_t j = 0; j < tiles; j++) {
            if (j + 1 < tiles) Scores(x, j + 1, mpad);
            const uint32_t v0 = j * PREFILL_KEYS, n = Min(PREFILL_KEYS, x.keys - v0);
            // V_j: per 16-key block, its D/16 fractals transposed.
            vL1Free_.BeforeWrite();
            Gather(vGm_, p_.v, x, v0, n, vL1);
            CopiesToL1Done();
            vL0Free_.BeforeWrite();
            for (uint32_t kb = 0; kb < PREFILL_KEYS / FRACTAL; kb++) {
                LoadData2DParams vp;
                vp.startIndex = kb;
                vp.repeatTimes = dp_ / FRACTAL;
                vp.srcStride = PREFILL_KEYS / FRACTAL;
                vp.ifTranspose = true;
                LoadData(vL0[kb * (dp_ / FRACTAL) * FRACTAL * FRACTAL], vL1, vp);
            }
            vL1Free_.AfterRead();
            // O_j = P_j·V_j once both vector units wrote P_j.
            CrossCoreWaitFlag(FLAG_P);
            pL1Free_.BeforeWrite();
            DataCopy(pL1, ws_.P(j % WS_SLOTS), Nd2NzParams(1, x.rows, PREFILL_KEYS, 0, PREFILL_KEYS, mpad, 1, 0));
            CopiesToL1Done();
            pL0Free_.BeforeWrite();
            ToL0A(pL0, pL1, mpad, PREFILL_KEYS);
            pL1Free_.AfterRead();
            MatmulToGm(ws_.O(j % WS_SLOTS), dp_, oL0, oL0Free_, pL0, vL0, x.rows, d_, PREFILL_KEYS, mpad);
            pL0Free_.AfterRead();
            vL0Free_.AfterRead();
            CrossCoreSetFlag<2, PIPE_FIX>(FLAG_O);
        }
        qL0Free_.AfterRead();  // the item's last Mmad with Q is issued
    }

    // S_j = Q·K_jᵀ into workspace slot j % 2 (K's NZ fractals are Kᵀ's nZ fractals, in order).
    __aicore__ inline void Scores(const Item& x, uint32_t j, uint32_t mpad) {
        const uint32_t v0 = j * PREFILL_KEYS, n = Min(PREFILL_KEYS, x.keys - v0);
        LocalTensor<T> kL1 = kL1_.Get<T>(), kL0 = kL0_.Get<T>(), qL0 = qL0_.Get<T>();
        LocalTensor<float> sL0 = sL0_.Get<float>();
        kL1Free_.BeforeWrite();
        Gather(kGm_, p_.k, x, v0, n, kL1);
        CopiesToL1Done();
        kL0Free_.BeforeWrite();
        TransposedToL0B(kL0, kL1, PREFILL_KEYS, dp_);
        kL1Free_.AfterRead();
        MatmulToGm(ws_.S(j % WS_SLOTS), PREFILL_KEYS, sL0, sL0Free_, qL0, kL0, x.rows, PREFILL_KEYS, d_, mpad);
        kL0Free_.AfterRead();
        CrossCoreSetFlag<2, PIPE_FIX>(FLAG_S);
    }

    EkPrefillParams p_;
    uint32_t d_ = 0, dp_ = 0;
    TPipe pipe_;
    TBuf<TPosition::A1> qL1_, pL1_;
    TBuf<TPosition::B1> kL1_, vL1_;
    TBuf<TPosition::A2> qL0_, pL0_;
    TBuf<TPosition::B2> kL0_, vL0_;
    TBuf<TPosition::CO1> sL0_, oL0_;
    L1Handoff qL1Free_, kL1Free_, vL1Free_, pL1Free_;
    L0Handoff qL0Free_, kL0Free_, vL0Free_, pL0Free_;
    L0CHandoff sL0Free_, oL0Free_;
    GlobalTensor<T> qGm_, kGm_, vGm_;
    Workspace<T> ws_;
    GlobalTensor<uint32_t> offsetsGm_, countsGm_, indicesGm_;
};

// ------------------------------------------------------------------------------------------------
// Vector side: rows [r0, r1) of each item, r0/r1 splitting the rows between the two AIVs.
//
// Every step works on the AIV's whole tile (≤ 32 rows × 64 keys, one 256-byte repeat per row)
// with per-row statistics as vectors in UB: row maxima and sums by two BlockReduce passes (8
// partial results per row, then 1), per-row values broadcast to one 32-byte block each (Brcb)
// and applied with a src1 block stride of 0. The scalar unit only computes the masks of the
// diagonal tile, so there is no vector→scalar round trip inside the key loop.

// Row statistics in one UB buffer (floats, offsets in units of HALF_ROWS, all 32-byte aligned):
// m ping-pong (2), l, α per workspace slot, row max, row sum, 8 partials per row, a broadcast
// block per row.
constexpr uint32_t HALF_ROWS = PREFILL_ROWS / 2;
constexpr uint32_t ST_M = 0, ST_L = 2, ST_ALPHA = 3, ST_MAX = ST_ALPHA + WS_SLOTS, ST_SUM = ST_MAX + 1;
constexpr uint32_t ST_PART = ST_SUM + 1, ST_BCAST = ST_PART + 8, ST_END = ST_BCAST + 8;
// Starting running max: finite, below any score, so a row with nothing visible yet keeps
// α = e^0 = 1 and P = e^(−inf) = 0 without special cases.
constexpr float M_START = -1e30f;

template <typename T> class PrefillVector {
public:
    __aicore__ inline void Run(const EkPrefillParams& p) {
        p_ = p;
        d_ = p.q.shape[3];
        dp_ = Up16(d_);
        scale_ = p.scale_log2 * LN2;
        outGm_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(p.out.ptr));
        lseGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(p.lse));
        offsetsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.offsets));
        countsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(p.counts));
        // The AIC this AIV belongs to and which of its two AIVs this is (1:2), as catlass's mixed
        // kernels compute them; GetBlockNum() counts AI cores on the AIV too.
        const uint32_t core = GetBlockIdx() / GetSubBlockNum();
        sub_ = GetSubBlockIdx();
        ws_.Init(p.workspace + (uint64_t)core * WS_SLOTS * WS_SLOT);
        pipe_.InitBuffer(sIn_, 1, HALF_ROWS * PREFILL_KEYS * sizeof(float));
        pipe_.InitBuffer(oIn_, 1, HALF_ROWS * PREFILL_MAX_D * sizeof(float));
        pipe_.InitBuffer(pOut_, 1, HALF_ROWS * PREFILL_KEYS * sizeof(T));
        pipe_.InitBuffer(rowsOut_, 1, HALF_ROWS * PREFILL_MAX_D * sizeof(T));
        pipe_.InitBuffer(lseOut_, 1, HALF_ROWS * ONE_BLK_SIZE);
        pipe_.InitBuffer(p32_, HALF_ROWS * PREFILL_KEYS * sizeof(float));
        pipe_.InitBuffer(acc_, HALF_ROWS * PREFILL_MAX_D * sizeof(float));
        pipe_.InitBuffer(stats_, ST_END * HALF_ROWS * sizeof(float));
        const uint32_t items = ItemCount(p);
        for (uint32_t it = core; it < items; it += GetBlockNum()) {
            Item x;
            if (MakeItem(p_, it, x, offsetsGm_, countsGm_)) Work(x);
        }
    }

private:
    __aicore__ inline LocalTensor<float> Stat(uint32_t at) { return stats_.Get<float>()[at * HALF_ROWS]; }
    __aicore__ inline LocalTensor<float> M(uint32_t which) { return Stat(ST_M + which); }
    // Rows rounded up to whole BlockReduce/Brcb repeats (8 rows each).
    __aicore__ inline uint8_t Groups() const { return (uint8_t)((n_ + FLOATS_PER_BLOCK - 1) / FLOATS_PER_BLOCK); }

    __aicore__ inline void Work(const Item& x) {
        const uint32_t split = (x.rows + 1) / 2;
        r0_ = sub_ == 0 ? 0 : split;
        n_ = (sub_ == 0 ? split : x.rows) - r0_;
        m_ = 0;
        if (n_ > 0) {
            Duplicate(M(m_), M_START, (int32_t)n_);
            VecBarrier();
            Duplicate(Stat(ST_L), 0.0f, (int32_t)n_);
            VecBarrier();
            Duplicate(acc_.Get<float>(), 0.0f, (int32_t)(n_ * dp_));
            VecBarrier();
        }
        // Tile j's softmax runs while the cube computes S_{j+1}; O_j is folded in after the
        // softmax of tile j + 1, with tile j's rescaling factors.
        const uint32_t tiles = (x.keys + PREFILL_KEYS - 1) / PREFILL_KEYS;
        for (uint32_t j = 0; j < tiles; j++) {
            Softmax(x, j);
            if (j > 0) Accumulate(j - 1);
        }
        Accumulate(tiles - 1);
        if (n_ > 0) Finish(x);
    }

    // rows[r][0..width) op= v[r] for n_ rows of `stride` floats: v broadcast one block per row,
    // read with a block stride of 0 in chunks of one repeat (64 floats).
    __aicore__ inline void RowScale(const LocalTensor<float>& rows, const LocalTensor<float>& v, uint32_t width, uint32_t stride) {
        LocalTensor<float> bc = Stat(ST_BCAST);
        Brcb(bc, v, Groups(), BrcbRepeatParams(1, 8));
        VecBarrier();
        const uint8_t rep = (uint8_t)(stride / FLOATS_PER_BLOCK);
        for (uint32_t c = 0; c < width; c += PREFILL_KEYS) {
            const uint64_t mask = Min(PREFILL_KEYS, width - c);
            Mul(rows[c], rows[c], bc, mask, (uint8_t)n_, BinaryRepeatParams(1, 1, 0, rep, rep, 1));
            VecBarrier();
        }
    }

    // Tile j: S rows from the workspace → scale, mask, running max and sum, P rows back.
    __aicore__ inline void Softmax(const Item& x, uint32_t j) {
        const uint32_t v0 = j * PREFILL_KEYS, slot = j % WS_SLOTS;
        CrossCoreWaitFlag(FLAG_S);
        if (n_ > 0) {
            LocalTensor<float> p32 = p32_.Get<float>();
            LocalTensor<float> m_old = M(m_), m_new = M(1 - m_), alpha = Stat(ST_ALPHA + slot);
            LocalTensor<float> s = sIn_.AllocTensor<float>();
            DataCopyPad(s, ws_.S(slot)[r0_ * PREFILL_KEYS], DataCopyExtParams(1, n_ * PREFILL_KEYS * sizeof(float), 0, 0, 0),
                        DataCopyPadExtParams<float>(true, 0, 0, 0.0f));
            sIn_.EnQue(s);
            s = sIn_.DeQue<float>();
            Muls(s, s, scale_, (int32_t)(n_ * PREFILL_KEYS));
            VecBarrier();
            // Keys a row may not see (past its token on the diagonal, or past the item's keys): −inf.
            for (uint32_t r = 0; r < n_; r++) {
                const uint32_t seen = x.Visible(r0_ + r, p_.group, p_.block_size);
                const uint32_t vis = seen > v0 ? Min(PREFILL_KEYS, seen - v0) : 0;
                if (vis == PREFILL_KEYS) continue;
                uint64_t hidden[2] = {~0ull << vis, 0};
                Duplicate(s[r * PREFILL_KEYS], NegInf(), hidden, 1, 1, 8);
                VecBarrier();
            }
            RowReduce<true>(Stat(ST_MAX), s, n_, PREFILL_KEYS, PREFILL_KEYS, Stat(ST_PART));  // ends with a barrier
            Max(m_new, m_old, Stat(ST_MAX), (int32_t)n_);
            VecBarrier();
            Sub(alpha, m_old, m_new, (int32_t)n_);
            VecBarrier();
            Exp(alpha, alpha, (int32_t)n_);
            VecBarrier();
            // P = e^(S − m_new), row by row through the broadcast block.
            LocalTensor<float> bc = Stat(ST_BCAST);
            Brcb(bc, m_new, Groups(), BrcbRepeatParams(1, 8));
            VecBarrier();
            Sub(p32, s, bc, (uint64_t)PREFILL_KEYS, (uint8_t)n_, BinaryRepeatParams(1, 1, 0, 8, 8, 1));
            VecBarrier();
            sIn_.FreeTensor(s);
            Exp(p32, p32, (int32_t)(n_ * PREFILL_KEYS));
            VecBarrier();
            RowReduce<false>(Stat(ST_SUM), p32, n_, PREFILL_KEYS, PREFILL_KEYS, Stat(ST_PART));  // ends with a barrier
            Mul(Stat(ST_L), Stat(ST_L), alpha, (int32_t)n_);
            VecBarrier();
            Add(Stat(ST_L), Stat(ST_L), Stat(ST_SUM), (int32_t)n_);
            VecBarrier();
            m_ = 1 - m_;
            LocalTensor<T> pt = pOut_.AllocTensor<T>();
            Cast(pt, p32, RoundMode::CAST_RINT, n_ * PREFILL_KEYS);
            VecBarrier();
            pOut_.EnQue(pt);
            pt = pOut_.DeQue<T>();
            DataCopyPad(ws_.P(slot)[r0_ * PREFILL_KEYS], pt, DataCopyExtParams(1, n_ * PREFILL_KEYS * sizeof(T), 0, 0, 0));
            pOut_.FreeTensor(pt);
        }
        CrossCoreSetFlag<2, PIPE_MTE3>(FLAG_P);
    }

    // O = α_j·O + O_j, once the cube wrote O_j.
    __aicore__ inline void Accumulate(uint32_t j) {
        const uint32_t slot = j % WS_SLOTS;
        CrossCoreWaitFlag(FLAG_O);
        if (n_ == 0) return;
        LocalTensor<float> acc = acc_.Get<float>();
        LocalTensor<float> o = oIn_.AllocTensor<float>();
        DataCopyPad(o, ws_.O(slot)[r0_ * dp_], DataCopyExtParams(1, n_ * dp_ * sizeof(float), 0, 0, 0),
                    DataCopyPadExtParams<float>(true, 0, 0, 0.0f));
        oIn_.EnQue(o);
        o = oIn_.DeQue<float>();
        RowScale(acc, Stat(ST_ALPHA + slot), dp_, dp_);
        Add(acc, acc, o, (int32_t)(n_ * dp_));
        VecBarrier();
        oIn_.FreeTensor(o);
    }

    // The item's rows: O / l into `out` (a run of G contiguous heads per token), and
    // lse = m + ln l.
    __aicore__ inline void Finish(const Item& x) {
        LocalTensor<float> acc = acc_.Get<float>(), inv = Stat(ST_SUM);
        Duplicate(inv, 1.0f, (int32_t)n_);
        VecBarrier();
        Div(inv, inv, Stat(ST_L), (int32_t)n_);
        VecBarrier();
        RowScale(acc, inv, dp_, dp_);
        LocalTensor<T> rows = rowsOut_.AllocTensor<T>();
        Cast(rows, acc, RoundMode::CAST_RINT, n_ * dp_);
        VecBarrier();
        rowsOut_.EnQue(rows);
        rows = rowsOut_.DeQue<T>();
        const uint32_t g = p_.group;
        for (uint32_t r = 0; r < n_;) {
            const uint32_t row = r0_ + r, t = x.t0 + row / g, first = row % g;
            const uint32_t run = Min(g - first, n_ - r);  // this token's heads among our rows
            const int64_t off =
                x.b * p_.out.stride[0] + t * p_.out.stride[1] + (x.h * g + first) * p_.out.stride[2];
            const uint32_t gap = (uint32_t)((p_.out.stride[2] - d_) * sizeof(T));
            DataCopyPad(outGm_[off], rows[r * dp_], DataCopyExtParams(run, d_ * sizeof(T), 0, gap, 0));
            r += run;
        }
        rowsOut_.FreeTensor(rows);
        if (p_.lse) {
            LocalTensor<float> lse = Stat(ST_MAX);
            Ln(lse, Stat(ST_L), (int32_t)n_);
            VecBarrier();
            Add(lse, lse, M(m_), (int32_t)n_);
            VecBarrier();
            LocalTensor<float> v = lseOut_.AllocTensor<float>();
            Brcb(v, lse, Groups(), BrcbRepeatParams(1, 8));
            VecBarrier();
            lseOut_.EnQue(v);
            v = lseOut_.DeQue<float>();
            for (uint32_t r = 0; r < n_; r++) {
                const uint32_t row = r0_ + r, t = x.t0 + row / g, hq = x.h * g + row % g;
                const uint64_t at = ((uint64_t)x.b * p_.q.shape[2] + hq) * p_.q.shape[1] + t;
                DataCopyPad(lseGm_[at], v[r * FLOATS_PER_BLOCK], DataCopyExtParams(1, sizeof(float), 0, 0, 0));
            }
            lseOut_.FreeTensor(v);
        }
    }

    EkPrefillParams p_;
    uint32_t d_ = 0, dp_ = 0, sub_ = 0;
    float scale_ = 0;
    uint32_t r0_ = 0, n_ = 0;  // this AIV's rows of the current item
    uint32_t m_ = 0;           // which of the two running-max vectors is current
    TPipe pipe_;
    TQue<TPosition::VECIN, 1> sIn_, oIn_;
    TQue<TPosition::VECOUT, 1> pOut_, rowsOut_, lseOut_;
    TBuf<TPosition::VECCALC> p32_, acc_, stats_;
    GlobalTensor<T> outGm_;
    GlobalTensor<float> lseGm_;
    Workspace<T> ws_;
    GlobalTensor<uint32_t> offsetsGm_, countsGm_;
};

template <typename T> class PrefillKernel {
public:
    __aicore__ inline void Run(const EkPrefillParams& p) {
        if ASCEND_IS_AIC {
            PrefillCube<T> k;
            k.Run(p);
        } else {
            PrefillVector<T> k;
            k.Run(p);
        }
    }
};

}  // namespace

// A mixed kernel (one AIC, two AIVs): the host passes the hardware sync address first (its
// cross-core flags live there) and the params second.
extern "C" __global__ __aicore__ void ek_prefill(GM_ADDR sync, GM_ADDR params) {
    KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_MIX_AIC_1_2);
    SetSyncBaseAddr(reinterpret_cast<uint64_t>(sync));
    const EkPrefillParams p = ReadParams<EkPrefillParams>(params);
    if (p.dtype == EK_BF16) {
        PrefillKernel<bfloat16_t> k;
        k.Run(p);
    } else {
        PrefillKernel<half> k;  // f16 (f32 runs on the vector cores: prefill_vector.cpp)
        k.Run(p);
    }
    DrainPipes();
}

// Helpers shared by the Ascend C kernels (no STL: the device compiler has none).
#pragma once

template <typename A, typename B> struct SameType {
    static constexpr bool value = false;
};
template <typename A> struct SameType<A, A> {
    static constexpr bool value = true;
};

// Dependent vector instructions run back to back only with a barrier between them (PipeBarrier
// page: Add then Mul needs PipeBarrier<PIPE_V>), unless the compiler's automatic synchronisation
// inserts it; the kernels place it themselves so they are right either way. Helpers that end with a
// vector instruction end with this barrier, so their callers need none right after them (a second
// barrier with nothing issued since orders nothing).
__aicore__ inline void VecBarrier() { AscendC::PipeBarrier<PIPE_V>(); }

// ln 2: the kernels get softmax scales in base 2 (the header's scale_log2) and exponentiate with Exp.
constexpr float LN2 = 0.6931471805599453f;
// f32 elements in one 32-byte data block and in one 256-byte vector repeat.
constexpr uint32_t FLOATS_PER_BLOCK = AscendC::ONE_BLK_SIZE / sizeof(float);
constexpr uint32_t FLOATS_PER_REPEAT = AscendC::ONE_REPEAT_BYTES / sizeof(float);

// -inf as a float, from its bit pattern.
__aicore__ inline float NegInf() {
    union {
        uint32_t u;
        float f;
    } v;
    v.u = 0xff800000u;
    return v.f;
}

// Elements of T in one UB row of `d` elements padded to the 32-byte grid.
template <typename T> __aicore__ inline uint32_t PaddedElems(uint32_t d) {
    const uint32_t per_block = AscendC::ONE_BLK_SIZE / sizeof(T);
    return (d + per_block - 1) / per_block * per_block;
}

// One float from a vector reduction of `n` elements, made visible to the scalar unit.
__aicore__ inline float ReduceToScalar(bool max, const AscendC::LocalTensor<float>& src, uint32_t n,
                                       const AscendC::LocalTensor<float>& red, const AscendC::LocalTensor<float>& work) {
    if (max) {
        AscendC::ReduceMax(red, src, work, (int32_t)n);
        VecBarrier();
    } else {
        AscendC::ReduceSum(red, src, work, (int32_t)n);
        VecBarrier();
    }
    AscendC::SetFlag<AscendC::HardEvent::V_S>(0);
    AscendC::WaitFlag<AscendC::HardEvent::V_S>(0);
    return red.GetValue(0);
}

// e^x for one scalar (the scalar unit has no exp): one lane of the vector unit.
__aicore__ inline float ScalarExp(float x, const AscendC::LocalTensor<float>& red) {
    AscendC::Duplicate(red, x, 8);
    VecBarrier();
    AscendC::Exp(red, red, 8);
    VecBarrier();
    AscendC::SetFlag<AscendC::HardEvent::V_S>(0);
    AscendC::WaitFlag<AscendC::HardEvent::V_S>(0);
    return red.GetValue(0);
}

// Scalar writes to UB made visible to the vector unit.
__aicore__ inline void ScalarToVector() {
    AscendC::SetFlag<AscendC::HardEvent::S_V>(0);
    AscendC::WaitFlag<AscendC::HardEvent::S_V>(0);
}

// `n` rows of `d` elements of T from GM (row stride `stride` elements) into padded UB rows of
// `que`'s next buffer (`held`, to be freed by the caller), returned as f32 rows: the buffer
// itself for f32, else widened into `wide`.
template <typename T, typename Que>
__aicore__ inline AscendC::LocalTensor<float> LoadRows(Que& que, const AscendC::LocalTensor<float>& wide,
                                                      const AscendC::GlobalTensor<T>& src, uint32_t n, uint32_t d,
                                                      int64_t stride, AscendC::LocalTensor<T>& held) {
    held = que.template AllocTensor<T>();
    AscendC::DataCopyExtParams cp(n, d * sizeof(T), (uint32_t)((stride - d) * sizeof(T)), 0, 0);
    AscendC::DataCopyPad(held, src, cp, AscendC::DataCopyPadExtParams<T>(true, 0, 0, T(0.0f)));
    que.EnQue(held);
    held = que.template DeQue<T>();
    if constexpr (SameType<T, float>::value) {
        return held;
    } else {
        AscendC::Cast(wide, held, AscendC::RoundMode::CAST_NONE, n * PaddedElems<T>(d));
        VecBarrier();
        return wide;
    }
}

// One row of `d` elements GM → UB → GM through `que` (a VECIN/VECOUT queue bind; its EnQue/DeQue
// orders the read before the write). DataCopyPad writes exactly the row's bytes to GM.
template <typename T, typename Que>
__aicore__ inline void MoveRow(Que& que, const AscendC::GlobalTensor<T>& src, const AscendC::GlobalTensor<T>& dst, uint32_t d) {
    AscendC::LocalTensor<T> t = que.template AllocTensor<T>();
    AscendC::DataCopyPad(t, src, AscendC::DataCopyExtParams(1, d * sizeof(T), 0, 0, 0),
                         AscendC::DataCopyPadExtParams<T>(true, 0, 0, T(0.0f)));
    que.EnQue(t);
    t = que.template DeQue<T>();
    AscendC::DataCopyPad(dst, t, AscendC::DataCopyExtParams(1, d * sizeof(T), 0, 0, 0));
    que.FreeTensor(t);
}

// Keys j0 .. j0 + n of cache head h of sequence `seq` from a paged pool (SPEC §7.3: page =
// table[seq · table_width + key / page_size], element page·page_stride + slot·slot_stride +
// h·head_stride) into the next buffer of `que`, row i at i·PaddedElems<T>(d), one strided copy per
// page the range touches; as f32 like LoadRows.
template <typename T, typename Que>
__aicore__ inline AscendC::LocalTensor<float> LoadPagedRows(Que& que, const AscendC::LocalTensor<float>& wide,
                                                           const AscendC::GlobalTensor<T>& pool,
                                                           const AscendC::GlobalTensor<uint32_t>& table, int64_t seq,
                                                           int32_t table_width, int32_t page_size, int64_t page_stride,
                                                           int64_t slot_stride, int64_t head_stride, int32_t h, uint32_t j0,
                                                           uint32_t n, uint32_t d, AscendC::LocalTensor<T>& held) {
    held = que.template AllocTensor<T>();
    const uint32_t dpt = PaddedElems<T>(d);
    for (uint32_t i = 0; i < n;) {
        const uint32_t key = j0 + i, slot = key % (uint32_t)page_size;
        const uint32_t run = (n - i) < ((uint32_t)page_size - slot) ? (n - i) : ((uint32_t)page_size - slot);
        const int64_t page = table.GetValue(seq * table_width + key / (uint32_t)page_size);
        const int64_t at = page * page_stride + (int64_t)slot * slot_stride + (int64_t)h * head_stride;
        AscendC::DataCopyExtParams cp(run, d * sizeof(T), (uint32_t)((slot_stride - d) * sizeof(T)), 0, 0);
        AscendC::DataCopyPad(held[i * dpt], pool[at], cp, AscendC::DataCopyPadExtParams<T>(true, 0, 0, T(0.0f)));
        i += run;
    }
    que.EnQue(held);
    held = que.template DeQue<T>();
    if constexpr (SameType<T, float>::value) {
        return held;
    } else {
        AscendC::Cast(wide, held, AscendC::RoundMode::CAST_NONE, n * dpt);
        VecBarrier();
        return wide;
    }
}

// One query row of `d` elements of T from GM into `dst` (dpf floats) as f32, times `scale`,
// through `que` (a one-row buffer).
template <typename T, typename Que>
__aicore__ inline void LoadScaledRow(Que& que, const AscendC::LocalTensor<float>& dst, const AscendC::GlobalTensor<T>& src,
                                     uint32_t d, uint32_t dpf, float scale) {
    AscendC::LocalTensor<T> t = que.template AllocTensor<T>();
    AscendC::DataCopyPad(t, src, AscendC::DataCopyExtParams(1, d * sizeof(T), 0, 0, 0),
                         AscendC::DataCopyPadExtParams<T>(true, 0, 0, T(0.0f)));
    que.EnQue(t);
    t = que.template DeQue<T>();
    if constexpr (SameType<T, float>::value) {
        AscendC::Muls(dst, t, scale, (int32_t)dpf);
        VecBarrier();
    } else {
        AscendC::Cast(dst, t, AscendC::RoundMode::CAST_NONE, dpf);
        VecBarrier();
        AscendC::Muls(dst, dst, scale, (int32_t)dpf);
        VecBarrier();
    }
    que.FreeTensor(t);
}

// An output row: `o` (dpf floats) times `inv_l`, rounded to T, to GM through `que`.
template <typename T, typename Que>
__aicore__ inline void StoreScaledRow(Que& que, const AscendC::GlobalTensor<T>& dst, const AscendC::LocalTensor<float>& o,
                                      uint32_t d, uint32_t dpf, float inv_l) {
    AscendC::Muls(o, o, inv_l, (int32_t)dpf);
    VecBarrier();
    AscendC::LocalTensor<T> t = que.template AllocTensor<T>();
    if constexpr (SameType<T, float>::value) {
        AscendC::DataCopy(t, o, dpf);
        VecBarrier();
    } else {
        AscendC::Cast(t, o, AscendC::RoundMode::CAST_RINT, dpf);
        VecBarrier();
    }
    que.EnQue(t);
    t = que.template DeQue<T>();
    AscendC::DataCopyPad(dst, t, AscendC::DataCopyExtParams(1, d * sizeof(T), 0, 0, 0));
    que.FreeTensor(t);
}

// The f32 staging buffer LoadRows widens 16-bit rows into; none for f32 rows (read in place).
template <typename T, typename Buf> __aicore__ inline AscendC::LocalTensor<float> WideBuffer(Buf& b) {
    return SameType<T, float>::value ? AscendC::LocalTensor<float>() : b.template Get<float>();
}

// dst[r] = max (MAX) or sum of the first `width` ≤ 64 floats of each of `rows` ≤ 255 rows of
// `src`, `stride` floats apart (a multiple of 8): BlockReduce to 8 partials per row (one repeat per
// row), then BlockReduce again over only the blocks the first pass filled. dst is 8-element
// aligned with room for `rows` rounded up to 8; `part` holds that many blocks.
template <bool MAX>
__aicore__ inline void RowReduce(const AscendC::LocalTensor<float>& dst, const AscendC::LocalTensor<float>& src, uint32_t rows,
                                 uint32_t width, uint32_t stride, const AscendC::LocalTensor<float>& part) {
    using namespace AscendC;
    const int32_t rep = (int32_t)(stride / FLOATS_PER_BLOCK), groups = (int32_t)((rows + FLOATS_PER_BLOCK - 1) / FLOATS_PER_BLOCK);
    const uint32_t filled = (width + FLOATS_PER_BLOCK - 1) / FLOATS_PER_BLOCK;
    uint64_t valid[2] = {0, 0};
    for (uint32_t k = 0; k < FLOATS_PER_BLOCK; k++) valid[0] |= ((1ull << filled) - 1) << (k * FLOATS_PER_BLOCK);
    if (MAX) {
        BlockReduceMax(part, src, (int32_t)rows, (int32_t)width, 1, 1, rep);
        VecBarrier();
        BlockReduceMax(dst, part, groups, valid, 1, 1, (int32_t)FLOATS_PER_BLOCK);
        VecBarrier();
    } else {
        BlockReduceSum(part, src, (int32_t)rows, (int32_t)width, 1, 1, rep);
        VecBarrier();
        BlockReduceSum(dst, part, groups, valid, 1, 1, (int32_t)FLOATS_PER_BLOCK);
        VecBarrier();
    }
}

// Dot products of one f32 row `q` (d elements) with n ≤ 255 f32 rows `keys` (`stride` floats
// apart, stride a multiple of 8) into dst[0..n) (8-element aligned; entries up to n rounded up
// to 8 are scratch), all keys per instruction: products in repeats of 64 dims with q read at a
// repeat stride of 0, folded into the first repeat, then RowReduce over the keys. Scratch: `tmp`
// n × stride floats, `part` n rounded up to 8 blocks.
__aicore__ inline void TileDots(const AscendC::LocalTensor<float>& dst, const AscendC::LocalTensor<float>& q,
                                const AscendC::LocalTensor<float>& keys, uint32_t n, uint32_t d, uint32_t stride,
                                const AscendC::LocalTensor<float>& tmp, const AscendC::LocalTensor<float>& part) {
    using namespace AscendC;
    const uint8_t rows = (uint8_t)n, rep = (uint8_t)(stride / FLOATS_PER_BLOCK);
    for (uint32_t c = 0; c < d; c += FLOATS_PER_REPEAT) {
        const uint64_t mask = d - c < FLOATS_PER_REPEAT ? d - c : FLOATS_PER_REPEAT;
        Mul(tmp[c], keys[c], q[c], mask, rows, BinaryRepeatParams(1, 1, 1, rep, rep, 0));
        VecBarrier();
    }
    for (uint32_t c = FLOATS_PER_REPEAT; c < d; c += FLOATS_PER_REPEAT) {
        const uint64_t mask = d - c < FLOATS_PER_REPEAT ? d - c : FLOATS_PER_REPEAT;
        Add(tmp, tmp, tmp[c], mask, rows, BinaryRepeatParams(1, 1, 1, rep, rep, rep));
        VecBarrier();
    }
    RowReduce<false>(dst, tmp, n, d < FLOATS_PER_REPEAT ? d : FLOATS_PER_REPEAT, stride, part);  // ends with a barrier
}

// rows[0] = Σ_j rows[j] over n rows `stride` floats apart, summed pairwise in place (whole rows
// per instruction: rows [m − half, m) onto rows [0, half); an odd middle row stays).
__aicore__ inline void FoldRows(const AscendC::LocalTensor<float>& rows, uint32_t n, uint32_t stride) {
    for (uint32_t m = n; m > 1;) {
        const uint32_t half = m / 2;
        AscendC::Add(rows, rows, rows[(m - half) * stride], (int32_t)(half * stride));
        VecBarrier();
        m -= half;
    }
}

// acc[0..d) += Σ_j w[j] · rows[j][0..d) for n ≤ 255 f32 rows `stride` floats apart, all rows per
// instruction: w broadcast one block per row (Brcb), products in repeats of 64 dims with the
// weight read at a block stride of 0, then the rows summed pairwise. Scratch: `tmp` n × stride
// floats, `bc` n rounded up to 8 blocks.
__aicore__ inline void TileWeightedSum(const AscendC::LocalTensor<float>& acc, const AscendC::LocalTensor<float>& w,
                                       const AscendC::LocalTensor<float>& rows, uint32_t n, uint32_t d, uint32_t stride,
                                       const AscendC::LocalTensor<float>& tmp, const AscendC::LocalTensor<float>& bc) {
    using namespace AscendC;
    const uint8_t rep = (uint8_t)(stride / FLOATS_PER_BLOCK);
    Brcb(bc, w, (uint8_t)((n + FLOATS_PER_BLOCK - 1) / FLOATS_PER_BLOCK), BrcbRepeatParams(1, 8));
    VecBarrier();
    for (uint32_t c = 0; c < d; c += FLOATS_PER_REPEAT) {
        const uint64_t mask = d - c < FLOATS_PER_REPEAT ? d - c : FLOATS_PER_REPEAT;
        Mul(tmp[c], rows[c], bc, mask, (uint8_t)n, BinaryRepeatParams(1, 1, 0, rep, rep, 1));
        VecBarrier();
    }
    FoldRows(tmp, n, stride);  // ends with a barrier (or issues nothing after the barriered Muls)
    Add(acc, acc, tmp, (int32_t)d);
    VecBarrier();
}

// Scratch of the row-by-tile attention step: TileDots/TileWeightedSum's, and the reductions'.
struct RowTileScratch {
    AscendC::LocalTensor<float> tmp, part, red, work;
};

// One online-softmax step of query row `q` over the first `n` keys of a K/V tile (rows `stride`
// floats apart; decode and the f32 prefill): the scores into `row`, the running max `m` and sum
// `l` updated through the scalar unit, then o = α·o + P·V over `o_len` floats.
__aicore__ inline void RowTileStep(const AscendC::LocalTensor<float>& o, uint32_t o_len, const AscendC::LocalTensor<float>& row,
                                   const AscendC::LocalTensor<float>& q, const AscendC::LocalTensor<float>& kt,
                                   const AscendC::LocalTensor<float>& vt, uint32_t n, uint32_t d, uint32_t stride,
                                   const RowTileScratch& s, float& m, float& l) {
    TileDots(row, q, kt, n, d, stride, s.tmp, s.part);  // ends with a barrier
    const float tile_max = ReduceToScalar(true, row, n, s.red, s.work);
    const float m_new = tile_max > m ? tile_max : m;
    const float alpha = ScalarExp(m - m_new, s.red);
    AscendC::Adds(row, row, -m_new, (int32_t)n);
    VecBarrier();
    AscendC::Exp(row, row, (int32_t)n);
    VecBarrier();
    l = l * alpha + ReduceToScalar(false, row, n, s.red, s.work);
    m = m_new;
    AscendC::Muls(o, o, alpha, (int32_t)o_len);
    VecBarrier();
    TileWeightedSum(o, row, vt, n, d, stride, s.tmp, s.part);  // ends with a barrier
}

// Copies a params struct out of global memory (the tiling-data pattern of Ascend C kernels).
template <typename P> __aicore__ inline P ReadParams(GM_ADDR params) {
    P p;
    for (uint32_t i = 0; i < sizeof(P); i++) reinterpret_cast<uint8_t*>(&p)[i] = params[i];
    return p;
}

// Instantiates Kernel<T> for the params' dtype and runs it.
// A kernel's last instruction: every pipe's outstanding work (MTE3/FIX copies to GM included)
// completes before the core ends. catlass ends its routines this way; the pages read do not say
// whether the kernel's end waits by itself (ascend/README.md, second review, L2).
__aicore__ inline void DrainPipes() { AscendC::PipeBarrier<PIPE_ALL>(); }

template <template <typename> class Kernel, typename P> __aicore__ inline void Dispatch(const P& p) {
    switch (p.dtype) {
        case EK_F16: {
            Kernel<half> k;
            k.Run(p);
            break;
        }
        case EK_BF16: {
            Kernel<bfloat16_t> k;
            k.Run(p);
            break;
        }
        default: {
            Kernel<float> k;
            k.Run(p);
            break;
        }
    }
    DrainPipes();
}

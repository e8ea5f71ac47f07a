// Cube-side steps shared by the mixed kernels (prefill.cpp, kv_compress_cube.cpp): L1 → L0
// fractal loads and one matrix product written to GM, with the pipe syncs between them.
#pragma once

namespace ekcube {

using namespace AscendC;

constexpr uint32_t FRACTAL = 16;  // rows and columns of a 16-bit fractal

__aicore__ inline uint32_t Up16(uint32_t x) { return (x + FRACTAL - 1) / FRACTAL * FRACTAL; }

// GM → L1 copies done before L1 → L0 loads read them.
__aicore__ inline void CopiesToL1Done() {
    SetFlag<HardEvent::MTE2_MTE1>(0);
    WaitFlag<HardEvent::MTE2_MTE1>(0);
}

// The write-after-read hand-off of one buffer between the pipe that reads it and the pipe that
// overwrites it (event E = reader_writer): the reader sets after its last read, the writer waits
// before overwriting. Set once at the start so the first write goes ahead and waited once at the
// end so no set is left pending — catlass's block_mmad_pingpong pairs MTE1_MTE2 (L1), M_MTE1
// (L0A/L0B) and FIX_M (L0C) events per buffer the same way. Without it the next GM → L1 copy,
// L1 → L0 load or Mmad may overwrite what the previous LoadData, Mmad or Fixpipe still reads.
template <HardEvent E> class Handoff {
public:
    __aicore__ inline void Start(int32_t id) {
        id_ = id;
        SetFlag<E>(id_);
    }
    __aicore__ inline void BeforeWrite() { WaitFlag<E>(id_); }
    __aicore__ inline void AfterRead() { SetFlag<E>(id_); }
    __aicore__ inline void Drain() { WaitFlag<E>(id_); }

private:
    int32_t id_ = 0;
};
using L1Handoff = Handoff<HardEvent::MTE1_MTE2>;  // L1: read by LoadData, written by GM copies
using L0Handoff = Handoff<HardEvent::M_MTE1>;     // L0A/L0B: read by Mmad, written by LoadData
using L0CHandoff = Handoff<HardEvent::FIX_M>;     // L0C: read by Fixpipe, written by Mmad

// L1 NZ (rows padded to `mpad`) → L0A zZ: one LoadData per 16-row block, `kpad` columns.
template <typename T> __aicore__ inline void ToL0A(const LocalTensor<T>& dst, const LocalTensor<T>& src, uint32_t mpad, uint32_t kpad) {
    for (uint32_t mb = 0; mb < mpad / FRACTAL; mb++) {
        LoadData2DParams lp;
        lp.startIndex = mb;
        lp.repeatTimes = kpad / FRACTAL;
        lp.srcStride = mpad / FRACTAL;
        LoadData(dst[mb * (kpad / FRACTAL) * FRACTAL * FRACTAL], src, lp);
    }
}

// `rows` × `dpad` L1 NZ rows (keys) → L0B as the transpose's nZ fractals: the NZ fractals of K
// are Kᵀ's nZ fractals, in order, so one plain LoadData does it.
template <typename T> __aicore__ inline void TransposedToL0B(const LocalTensor<T>& dst, const LocalTensor<T>& src, uint32_t rows, uint32_t dpad) {
    LoadData2DParams kp;
    kp.repeatTimes = (dpad / FRACTAL) * (rows / FRACTAL);
    kp.srcStride = 1;
    LoadData(dst, src, kp);
}

// dst (row pitch `pitch` floats) = A·B for A m×k in L0A and B k×n in L0B, through `c` in L0C
// (rows padded to `mpad`), once the L0 loads are done and `c`'s previous Fixpipe has drained it.
// The caller releases A and B (their L0Handoff) after this returns.
template <typename T>
__aicore__ inline void MatmulToGm(const GlobalTensor<float>& dst, uint32_t pitch, const LocalTensor<float>& c, L0CHandoff& cFree,
                                  const LocalTensor<T>& a, const LocalTensor<T>& b, uint32_t m, uint32_t n, uint32_t k, uint32_t mpad) {
    SetFlag<HardEvent::MTE1_M>(0);
    WaitFlag<HardEvent::MTE1_M>(0);
    cFree.BeforeWrite();
    MmadParams mp;
    // m = 1 would switch the cube to GEMV mode, which reads L0A as a plain vector rather than the
    // zZ fractals loaded here (ops-transformer's attention matmul forces m = 16 for this): run a
    // whole fractal row instead; the padding rows are dropped by Fixpipe's mSize.
    mp.m = m == 1 ? FRACTAL : m;
    mp.n = n;
    mp.k = k;
    Mmad(c, a, b, mp);
    // catlass barriers the M pipe after small Mmads (unverified why; harmless).
    PipeBarrier<PIPE_M>();
    SetFlag<HardEvent::M_FIX>(0);
    WaitFlag<HardEvent::M_FIX>(0);
    FixpipeParamsV220 fp;
    fp.nSize = n;
    fp.mSize = m;
    fp.srcStride = mpad;
    fp.dstStride = pitch;
    Fixpipe(dst, c, fp);
    cFree.AfterRead();
}

}  // namespace ekcube

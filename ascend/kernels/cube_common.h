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
// (rows padded to `mpad`).
template <typename T>
__aicore__ inline void MatmulToGm(const GlobalTensor<float>& dst, uint32_t pitch, const LocalTensor<float>& c, const LocalTensor<T>& a,
                                  const LocalTensor<T>& b, uint32_t m, uint32_t n, uint32_t k, uint32_t mpad) {
    SetFlag<HardEvent::MTE1_M>(0);
    WaitFlag<HardEvent::MTE1_M>(0);
    MmadParams mp;
    mp.m = m;
    mp.n = n;
    mp.k = k;
    Mmad(c, a, b, mp);
    SetFlag<HardEvent::M_FIX>(0);
    WaitFlag<HardEvent::M_FIX>(0);
    FixpipeParamsV220 fp;
    fp.nSize = n;
    fp.mSize = m;
    fp.srcStride = mpad;
    fp.dstStride = pitch;
    Fixpipe(dst, c, fp);
}

}  // namespace ekcube

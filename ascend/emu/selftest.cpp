// Planted violations, one per emulator rule, and a check of the level-0 mask/repeat/stride
// semantics: tests/ascend_emu.rs runs each and expects the matching failure (or values).

#include "kernel_operator.h"

using namespace AscendC;

namespace {

struct SelfTest {
    int32_t code;
    int32_t pad;
    float* in;   // 512 floats
    float* out;  // 512 floats

    // The input and output as the GM tensors a kernel reads and writes.
    GlobalTensor<float> In() const { return Gm(in); }
    GlobalTensor<float> Out() const { return Gm(out); }
    static GlobalTensor<float> Gm(float* p) {
        GlobalTensor<float> g;
        g.SetGlobalBuffer(p, 512);
        return g;
    }
};

void Correct(const SelfTest& t) {
    TPipe pipe;
    TQue<TPosition::VECIN, 1> in;
    TQue<TPosition::VECOUT, 1> out;
    TBuf<TPosition::VECCALC> tmp;
    pipe.InitBuffer(in, 1, 256 * sizeof(float));
    pipe.InitBuffer(out, 1, 256 * sizeof(float));
    pipe.InitBuffer(tmp, 256 * sizeof(float));
    GlobalTensor<float> src = t.In(), dst = t.Out();
    LocalTensor<float> x = in.AllocTensor<float>();
    DataCopy(x, src, 256);
    in.EnQue(x);
    x = in.DeQue<float>();
    LocalTensor<float> y = out.AllocTensor<float>();
    Muls(y, x, 2.0f, 256);
    out.EnQue(y);
    in.FreeTensor(x);
    y = out.DeQue<float>();
    DataCopy(dst, y, 256);
    out.FreeTensor(y);
    SetFlag<HardEvent::V_S>(1);
    WaitFlag<HardEvent::V_S>(1);
}

// Level 0: Add over two repeats with a bit mask and non-unit strides; Muls with a count mask.
void Level0(const SelfTest& t) {
    TPipe pipe;
    TBuf<TPosition::VECCALC> a, b, c;
    pipe.InitBuffer(a, 512 * sizeof(float));
    pipe.InitBuffer(b, 512 * sizeof(float));
    pipe.InitBuffer(c, 512 * sizeof(float));
    GlobalTensor<float> src = t.In(), dst = t.Out();
    LocalTensor<float> x = a.Get<float>(), y = b.Get<float>(), z = c.Get<float>();
    DataCopy(x, src, 512);
    DataCopy(y, src, 512);
    Duplicate(z, -1.0f, 512);
    const uint64_t mask[2] = {0xF0F0F0F0F0F0F0F0ull, 0};
    // dst block stride 2, src0 repeat stride 16 blocks, src1 plain.
    Add(z, x, y, mask, 2, BinaryRepeatParams(2, 1, 1, 16, 16, 8));
    Muls(z[384], x[384], 3.0f, 10, 2, UnaryRepeatParams(1, 1, 8, 8));
    DataCopy(dst, z, 512);
}

// Sort32 over two groups of the first 64 inputs (indices 0..63), then MrgSort of the two
// groups: out holds 64 (score, index) structures.
void SortSemantics(const SelfTest& t) {
    TPipe pipe;
    TBuf<TPosition::VECCALC> sc, ix, a, b;
    pipe.InitBuffer(sc, 64 * 4);
    pipe.InitBuffer(ix, 64 * 4);
    pipe.InitBuffer(a, 64 * 8);
    pipe.InitBuffer(b, 64 * 8);
    GlobalTensor<float> src = t.In(), dst = t.Out();
    LocalTensor<float> s = sc.Get<float>(), x = a.Get<float>(), y = b.Get<float>();
    LocalTensor<uint32_t> i = ix.Get<uint32_t>();
    DataCopy(s, src, 64);
    for (uint32_t k = 0; k < 64; k++) i.SetValue(k, k);
    Sort32(x, s, i, 2);
    const uint16_t len[4] = {32, 32, 0, 0};
    MrgSort(y, MrgSortSrcList<float>(x, x[64], x, x), MrgSort4Info(len, false, 0x3, 1));
    DataCopy(dst, y, 128);
}

// BlockReduceMax over 4 repeats and BlockReduceSum over 4 more (one result per 8-float block),
// Brcb of the first 16 results, and a level-0 Duplicate with a bit mask over two repeats:
// out[0..64) the reductions, out[64..192) the broadcast, out[192..320) the masked fill.
void ReduceBroadcastSemantics(const SelfTest& t) {
    TPipe pipe;
    TBuf<TPosition::VECCALC> a, r, c, d;
    pipe.InitBuffer(a, 512 * 4);
    pipe.InitBuffer(r, 64 * 4);
    pipe.InitBuffer(c, 128 * 4);
    pipe.InitBuffer(d, 128 * 4);
    GlobalTensor<float> src = t.In(), dst = t.Out();
    LocalTensor<float> x = a.Get<float>(), red = r.Get<float>(), bc = c.Get<float>(), fill = d.Get<float>();
    DataCopy(x, src, 512);
    BlockReduceMax(red, x, 4, 64, 1, 1, 8);
    BlockReduceSum(red[32], x[256], 4, 64, 1, 1, 8);
    Brcb(bc, red, 2, BrcbRepeatParams(1, 8));
    Duplicate(fill, 0.0f, 128);
    const uint64_t mask[2] = {0xFF00FF00FF00FF00ull, 0};
    Duplicate(fill, 7.0f, mask, 2, 1, 8);
    DataCopy(dst, red, 64);
    DataCopy(dst[64], bc, 128);
    DataCopy(dst[192], fill, 128);
}

// CompareScalar (x > 0 over 256 inputs) into a bit mask, Select of x or −1 by it, and GatherMask
// of the first 200 inputs by it (counter mode): out[0..256) the selection, out[256..256 + cnt)
// the gathered inputs, out[511] = cnt; the rest stays as the output came in.
void CompareSelectGatherSemantics(const SelfTest& t) {
    TPipe pipe;
    TBuf<TPosition::VECCALC> a, m, y, z;
    pipe.InitBuffer(a, 256 * 4);
    pipe.InitBuffer(m, 256 / 8);
    pipe.InitBuffer(y, 256 * 4);
    pipe.InitBuffer(z, 256 * 4);
    GlobalTensor<float> src = t.In(), dst = t.Out();
    LocalTensor<float> x = a.Get<float>(), sel = y.Get<float>(), gathered = z.Get<float>();
    LocalTensor<uint8_t> mask = m.Get<uint8_t>();
    DataCopy(x, src, 256);
    CompareScalar(mask, x, 0.0f, CMPMODE::GT, 256);
    Select(sel, mask, x, -1.0f, SELMODE::VSEL_TENSOR_SCALAR_MODE, 256);
    uint64_t cnt = 0;
    GatherMask(gathered, x, mask.ReinterpretCast<uint32_t>(), true, 200, GatherMaskParams(1, 1, 0, 0), cnt);
    DataCopy(dst, sel, 256);
    DataCopyPad(dst[256], gathered, DataCopyExtParams(1, (uint32_t)cnt * 4, 0, 0, 0));
    dst.SetValue(511, (float)cnt);
}

}  // namespace

extern "C" void ek_emu_selftest_kernel(uint8_t* arg) {
    const SelfTest& t = *reinterpret_cast<const SelfTest*>(arg);
    switch (t.code) {
        case 0:
            Correct(t);
            break;
        case 1: {  // UB overflow
            TPipe pipe;
            TBuf<TPosition::VECCALC> big;
            pipe.InitBuffer(big, 200 * 1024);
            break;
        }
        case 2: {  // misaligned vector operand
            TPipe pipe;
            TBuf<TPosition::VECCALC> buf;
            pipe.InitBuffer(buf, 1024);
            LocalTensor<float> x = buf.Get<float>();
            Adds(x[1], x[1], 1.0f, 8);
            break;
        }
        case 3: {  // DataCopy of a partial block
            TPipe pipe;
            TBuf<TPosition::VECCALC> buf;
            pipe.InitBuffer(buf, 1024);
            GlobalTensor<float> src = t.In();
            DataCopy(buf.Get<float>(), src, 7);
            break;
        }
        case 4: {  // DeQue on an empty queue
            TPipe pipe;
            TQue<TPosition::VECIN, 1> q;
            pipe.InitBuffer(q, 1, 256);
            LocalTensor<float> x = q.DeQue<float>();
            (void)x;
            break;
        }
        case 5: {  // AllocTensor with every buffer in use
            TPipe pipe;
            TQue<TPosition::VECIN, 1> q;
            pipe.InitBuffer(q, 1, 256);
            LocalTensor<float> x = q.AllocTensor<float>();
            LocalTensor<float> y = q.AllocTensor<float>();
            (void)x;
            (void)y;
            break;
        }
        case 6: {  // EnQue of a tensor another queue handed out
            TPipe pipe;
            TQue<TPosition::VECIN, 1> q1, q2;
            pipe.InitBuffer(q1, 1, 256);
            pipe.InitBuffer(q2, 1, 256);
            LocalTensor<float> x = q1.AllocTensor<float>();
            q2.EnQue(x);
            break;
        }
        case 7: {  // a tensor never freed
            TPipe pipe;
            TQue<TPosition::VECIN, 1> q;
            pipe.InitBuffer(q, 1, 256);
            LocalTensor<float> x = q.AllocTensor<float>();
            (void)x;
            break;
        }
        case 8:  // WaitFlag with no SetFlag
            WaitFlag<HardEvent::MTE2_V>(0);
            break;
        case 9:  // SetFlag twice
            SetFlag<HardEvent::V_MTE3>(2);
            SetFlag<HardEvent::V_MTE3>(2);
            break;
        case 10:  // SetFlag never waited for
            SetFlag<HardEvent::MTE3_MTE2>(0);
            break;
        case 11: {  // read past a tensor
            TPipe pipe;
            TBuf<TPosition::VECCALC> buf;
            pipe.InitBuffer(buf, 64);
            LocalTensor<float> x = buf.Get<float>();
            (void)x.GetValue(16);
            break;
        }
        case 12: {  // two pipes
            TPipe a;
            TPipe b;
            break;
        }
        case 13: {  // a count mask beyond a repeat (64 floats)
            TPipe pipe;
            TBuf<TPosition::VECCALC> buf;
            pipe.InitBuffer(buf, 1024);
            LocalTensor<float> x = buf.Get<float>();
            Adds(x, x, 1.0f, 65, 1, UnaryRepeatParams());
            break;
        }
        case 14: {  // FreeTensor of a queued tensor
            TPipe pipe;
            TQue<TPosition::VECIN, 1> q;
            pipe.InitBuffer(q, 1, 256);
            LocalTensor<float> x = q.AllocTensor<float>();
            q.EnQue(x);
            q.FreeTensor(x);
            break;
        }
        case 15: {  // more than 8 queue buffers on one position
            TPipe pipe;
            TQue<TPosition::VECIN, 4> a, b, c;
            pipe.InitBuffer(a, 4, 32);
            pipe.InitBuffer(b, 4, 32);
            pipe.InitBuffer(c, 4, 32);
            break;
        }
        case 16: {  // GM access past the declared size
            GlobalTensor<float> g;
            g.SetGlobalBuffer(t.in, 8);
            (void)g.GetValue(8);
            break;
        }
        case 17:  // MrgSort of a list that is not sorted
        case 19:  // MrgSort list longer than 4095
        case 20: {  // MrgSort into one of its lists
            TPipe pipe;
            TBuf<TPosition::VECCALC> a, d;
            pipe.InitBuffer(a, 4096 * 8 * 2);
            pipe.InitBuffer(d, 4096 * 8 * 2);
            LocalTensor<float> x = a.Get<float>();
            Duplicate(x, 1.0f, 4096 * 4);
            if (t.code == 17) x.SetValue(4, 2.0f);  // structure 2 outranks structure 1
            const uint16_t len[4] = {(uint16_t)(t.code == 19 ? 4096 : 16), 16, 0, 0};
            LocalTensor<float> dst = t.code == 20 ? x[64] : d.Get<float>();
            MrgSort(dst, MrgSortSrcList<float>(x, x[64], x, x), MrgSort4Info(len, false, 0x3, 1));
            break;
        }
        case 18: {  // Sort32 with more than 255 repeats
            TPipe pipe;
            TBuf<TPosition::VECCALC> a, b, d;
            pipe.InitBuffer(a, 256 * 32 * 4);
            pipe.InitBuffer(b, 256 * 32 * 4);
            pipe.InitBuffer(d, 256 * 32 * 8);
            Sort32(d.Get<float>(), a.Get<float>(), b.Get<uint32_t>(), 256);
            break;
        }
        case 21: {  // L1 on a vector core
            TPipe pipe;
            TBuf<TPosition::A1> l1;
            pipe.InitBuffer(l1, 1024);
            break;
        }
        case 22: {  // Brcb in place
            TPipe pipe;
            TBuf<TPosition::VECCALC> a;
            pipe.InitBuffer(a, 512);
            Brcb(a.Get<float>(), a.Get<float>(), 1, BrcbRepeatParams(1, 8));
            break;
        }
        case 23: {  // BlockReduceMax into a dst that is not 8-element aligned
            TPipe pipe;
            TBuf<TPosition::VECCALC> a, r;
            pipe.InitBuffer(a, 512);
            pipe.InitBuffer(r, 512);
            BlockReduceMax(r.Get<float>()[4], a.Get<float>(), 1, 64, 1, 1, 8);
            break;
        }
        case 24: {  // a count-mode compare over part of a repeat
            TPipe pipe;
            TBuf<TPosition::VECCALC> a, m;
            pipe.InitBuffer(a, 512);
            pipe.InitBuffer(m, 64);
            CompareScalar(m.Get<uint8_t>(), a.Get<float>(), 0.0f, CMPMODE::GE, 100);
            break;
        }
        case 25: {  // a GatherMask pattern off the 32-byte grid
            TPipe pipe;
            TBuf<TPosition::VECCALC> a, m, o;
            pipe.InitBuffer(a, 256);
            pipe.InitBuffer(m, 64);
            pipe.InitBuffer(o, 256);
            uint64_t cnt = 0;
            GatherMask(o.Get<float>(), a.Get<float>(), m.Get<uint32_t>()[1], true, 32, GatherMaskParams(1, 1, 0, 0), cnt);
            break;
        }
        case 100:
            Level0(t);
            break;
        case 103:
            CompareSelectGatherSemantics(t);
            break;
        case 102:
            ReduceBroadcastSemantics(t);
            break;
        case 101:
            SortSemantics(t);
            break;
        default:
            EmuFail("unknown self test");
    }
}

// ------------------------------------------------------------------------------------------------
// Mixed launches (one AIC with two AIVs): planted violations of the cube and cross-core rules,
// and the cube data path checked against plain matrix products.

namespace {

// S = X·Yᵀ and O = X·Z through Nd2Nz, LoadData (plain and transposed), Mmad and Fixpipe, with
// X 32×32, Y 16×32, Z 32×16 read from in[0..], in[1024..], in[1536..]; out[0..512] = S,
// out[512..1024] = O (row-major f32).
void CubeSemantics(const SelfTest& t) {
    if (ASCEND_IS_AIV) return;
    static std::vector<half> h(2048);
    for (int i = 0; i < 2048; i++) h[i] = half(t.in[i]);
    GlobalTensor<half> x, y, z;
    x.SetGlobalBuffer(h.data(), 1024);
    y.SetGlobalBuffer(h.data() + 1024, 512);
    z.SetGlobalBuffer(h.data() + 1536, 512);
    GlobalTensor<float> out;
    out.SetGlobalBuffer(t.out, 1024);
    TPipe pipe;
    TBuf<TPosition::A1> xl1;
    TBuf<TPosition::B1> yl1, zl1;
    TBuf<TPosition::A2> xl0;
    TBuf<TPosition::B2> yl0, zl0;
    TBuf<TPosition::CO1> c;
    pipe.InitBuffer(xl1, 2048);
    pipe.InitBuffer(yl1, 1024);
    pipe.InitBuffer(zl1, 1024);
    pipe.InitBuffer(xl0, 2048);
    pipe.InitBuffer(yl0, 1024);
    pipe.InitBuffer(zl0, 1024);
    pipe.InitBuffer(c, 2048);
    // ND -> NZ: 16-column strips of all rows.
    DataCopy(xl1.Get<half>(), x, Nd2NzParams(1, 32, 32, 0, 32, 32, 1, 0));
    DataCopy(yl1.Get<half>(), y, Nd2NzParams(1, 16, 32, 0, 32, 16, 1, 0));
    DataCopy(zl1.Get<half>(), z, Nd2NzParams(1, 32, 16, 0, 16, 32, 1, 0));
    SetFlag<HardEvent::MTE2_MTE1>(0);
    WaitFlag<HardEvent::MTE2_MTE1>(0);
    for (int mb = 0; mb < 2; mb++) {  // X: zZ, one call per 16-row block
        LoadData2DParams lp;
        lp.startIndex = mb;
        lp.repeatTimes = 2;
        lp.srcStride = 2;
        LoadData(xl0.Get<half>()[mb * 2 * 256], xl1.Get<half>(), lp);
    }
    LoadData2DParams yp;  // Yᵀ: Y's NZ fractals are Yᵀ's nZ fractals
    yp.repeatTimes = 2;
    yp.srcStride = 1;
    LoadData(yl0.Get<half>(), yl1.Get<half>(), yp);
    for (int kb = 0; kb < 2; kb++) {  // Z: each 16-row block's fractal, transposed
        LoadData2DParams zp;
        zp.startIndex = kb;
        zp.repeatTimes = 1;
        zp.srcStride = 2;
        zp.ifTranspose = true;
        LoadData(zl0.Get<half>()[kb * 256], zl1.Get<half>(), zp);
    }
    SetFlag<HardEvent::MTE1_M>(0);
    WaitFlag<HardEvent::MTE1_M>(0);
    MmadParams mp;
    mp.m = 32;
    mp.n = 16;
    mp.k = 32;
    FixpipeParamsV220 fp;
    fp.nSize = 16;
    fp.mSize = 32;
    fp.srcStride = 32;
    fp.dstStride = 16;
    Mmad(c.Get<float>(), xl0.Get<half>(), yl0.Get<half>(), mp);
    Fixpipe(out, c.Get<float>(), fp);
    Mmad(c.Get<float>(), xl0.Get<half>(), zl0.Get<half>(), mp);
    Fixpipe(out[512], c.Get<float>(), fp);
}

}  // namespace

extern "C" void ek_emu_selftest_mix(uint8_t* which) {
    const SelfTest& t = *reinterpret_cast<const SelfTest*>(which);
    switch (t.code) {
        case 31: {  // UB on the cube core
            if (ASCEND_IS_AIV) return;
            TPipe pipe;
            TBuf<TPosition::VECCALC> ub;
            pipe.InitBuffer(ub, 1024);
            break;
        }
        case 32: {  // LoadData to an L0A address off the 512-byte grid
            if (ASCEND_IS_AIV) return;
            TPipe pipe;
            TBuf<TPosition::A1> l1;
            TBuf<TPosition::A2> l0;
            pipe.InitBuffer(l1, 1024);
            pipe.InitBuffer(l0, 2048);
            LoadData2DParams lp;
            lp.repeatTimes = 1;
            LoadData(l0.Get<half>()[16], l1.Get<half>(), lp);
            break;
        }
        case 33: {  // Mmad with the operands in the wrong buffers
            if (ASCEND_IS_AIV) return;
            TPipe pipe;
            TBuf<TPosition::A2> a;
            TBuf<TPosition::B2> b;
            TBuf<TPosition::CO1> c;
            pipe.InitBuffer(a, 512);
            pipe.InitBuffer(b, 512);
            pipe.InitBuffer(c, 1024);
            MmadParams mp;
            mp.m = mp.n = mp.k = 16;
            Mmad(c.Get<float>(), b.Get<half>(), a.Get<half>(), mp);
            break;
        }
        case 34:  // the AIC waits for a flag no AIV ever sets
            if (ASCEND_IS_AIC) CrossCoreWaitFlag(1);
            break;
        case 35:  // the AIC sets a flag no AIV waits for
            if (ASCEND_IS_AIC) CrossCoreSetFlag<2, PIPE_FIX>(1);
            break;
        case 36:  // a flag id beyond A2's range
            if (ASCEND_IS_AIC) CrossCoreSetFlag<2, PIPE_FIX>(11);
            break;
        case 37: {  // a transposing LoadData of 32-bit data
            if (ASCEND_IS_AIV) return;
            TPipe pipe;
            TBuf<TPosition::B1> l1;
            TBuf<TPosition::B2> l0;
            pipe.InitBuffer(l1, 1024);
            pipe.InitBuffer(l0, 1024);
            LoadData2DParams lp;
            lp.repeatTimes = 1;
            lp.ifTranspose = true;
            LoadData(l0.Get<float>(), l1.Get<float>(), lp);
            break;
        }
        case 38: {  // Fixpipe to half without the matching quantPre
            if (ASCEND_IS_AIV) return;
            static std::vector<half> dst(256);
            GlobalTensor<half> g;
            g.SetGlobalBuffer(dst.data(), 256);
            TPipe pipe;
            TBuf<TPosition::CO1> c;
            pipe.InitBuffer(c, 1024);
            FixpipeParamsV220 fp;
            fp.nSize = fp.mSize = fp.srcStride = fp.dstStride = 16;
            Fixpipe(g, c.Get<float>(), fp);
            break;
        }
        case 39:  // 16 sets of one flag before any wait (the AIVs wait for flag 3 first)
            if (ASCEND_IS_AIC) {
                for (int i = 0; i < 16; i++) CrossCoreSetFlag<2, PIPE_FIX>(2);
                CrossCoreSetFlag<2, PIPE_FIX>(3);
            } else {
                CrossCoreWaitFlag(3);
                for (int i = 0; i < 16; i++) CrossCoreWaitFlag(2);
            }
            break;
        case 200:
            CubeSemantics(t);
            break;
        default:
            EmuFail("unknown mixed self test");
    }
}

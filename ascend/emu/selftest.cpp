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

// The semantics checks below test values, not synchronisation: each step waits for everything
// before it.
void Settle() { PipeBarrier<PIPE_ALL>(); }

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
    Settle();
    const uint64_t mask[2] = {0xF0F0F0F0F0F0F0F0ull, 0};
    // dst block stride 2, src0 repeat stride 16 blocks, src1 plain.
    Add(z, x, y, mask, 2, BinaryRepeatParams(2, 1, 1, 16, 16, 8));
    Muls(z[384], x[384], 3.0f, 10, 2, UnaryRepeatParams(1, 1, 8, 8));
    Settle();
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
    Settle();
    Sort32(x, s, i, 2);
    Settle();
    const uint16_t len[4] = {32, 32, 0, 0};
    MrgSort(y, MrgSortSrcList<float>(x, x[64], x, x), MrgSort4Info(len, false, 0x3, 1));
    Settle();
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
    Settle();
    BlockReduceMax(red, x, 4, 64, 1, 1, 8);
    BlockReduceSum(red[32], x[256], 4, 64, 1, 1, 8);
    Duplicate(fill, 0.0f, 128);
    Settle();
    Brcb(bc, red, 2, BrcbRepeatParams(1, 8));
    const uint64_t mask[2] = {0xFF00FF00FF00FF00ull, 0};
    Duplicate(fill, 7.0f, mask, 2, 1, 8);
    Settle();
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
    Settle();
    CompareScalar(mask, x, 0.0f, CMPMODE::GT, 256);
    Settle();
    Select(sel, mask, x, -1.0f, SELMODE::VSEL_TENSOR_SCALAR_MODE, 256);
    uint64_t cnt = 0;
    GatherMask(gathered, x, mask.ReinterpretCast<uint32_t>(), true, 200, GatherMaskParams(1, 1, 0, 0), cnt);
    SetFlag<HardEvent::V_S>(0);  // the count is the vector pipe's: wait for it
    WaitFlag<HardEvent::V_S>(0);
    Settle();
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
            Settle();
            if (t.code == 17) x.SetValue(4, 2.0f);  // structure 2 outranks structure 1
            Settle();
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
        // The asynchronous pipes (emu_pipes.h): each unsynchronised pair is a race.
        case 26: {  // a vector instruction reads what the previous one writes, no PipeBarrier<PIPE_V>
            // (the PipeBarrier page: Add then Mul needs PipeBarrier<PIPE_V> between them)
            TPipe pipe;
            TBuf<TPosition::VECCALC> a, b;
            pipe.InitBuffer(a, 1024);
            pipe.InitBuffer(b, 1024);
            Duplicate(a.Get<float>(), 1.0f, 64);
            Adds(b.Get<float>(), a.Get<float>(), 1.0f, 64);
            break;
        }
        case 27: {  // a vector read of a GM -> UB copy with no MTE2_V flag (SetFlag/WaitFlag page)
            TPipe pipe;
            TBuf<TPosition::VECCALC> a, b;
            pipe.InitBuffer(a, 1024);
            pipe.InitBuffer(b, 1024);
            DataCopy(a.Get<float>(), t.In(), 64);
            Muls(b.Get<float>(), a.Get<float>(), 2.0f, 64);
            break;
        }
        case 28: {  // a GM -> UB copy over a tensor a vector instruction may still read (no V_MTE2)
            TPipe pipe;
            TBuf<TPosition::VECCALC> a, b;
            pipe.InitBuffer(a, 1024);
            pipe.InitBuffer(b, 1024);
            Muls(b.Get<float>(), a.Get<float>(), 2.0f, 64);  // (reads poison: values do not matter here)
            DataCopy(a.Get<float>(), t.In(), 64);
            break;
        }
        case 29: {  // the scalar unit writes a tensor the previous UB -> GM copy may still read (no MTE3_S)
            TPipe pipe;
            TBuf<TPosition::VECOUT> b;
            pipe.InitBuffer(b, 256);
            LocalTensor<float> o = b.Get<float>();
            for (uint32_t i = 0; i < 8; i++) o.SetValue(i, 1.0f);
            SetFlag<HardEvent::S_MTE3>(0);
            WaitFlag<HardEvent::S_MTE3>(0);
            DataCopy(t.Out(), o, 8);
            o.SetValue(0, 2.0f);
            break;
        }
        case 30: {  // GatherMask's count used with no V_S flag after it
            TPipe pipe;
            TBuf<TPosition::VECCALC> a, m, o;
            pipe.InitBuffer(a, 256);
            pipe.InitBuffer(m, 64);
            pipe.InitBuffer(o, 256);
            Duplicate(a.Get<float>(), 1.0f, 64);
            Duplicate(m.Get<uint32_t>(), 0xffffffffu, 8);
            PipeBarrier<PIPE_V>();
            uint64_t cnt = 0;
            GatherMask(o.Get<float>(), a.Get<float>(), m.Get<uint32_t>(), true, 32, GatherMaskParams(1, 1, 0, 0), cnt);
            Adds(a.Get<float>(), a.Get<float>(), (float)cnt, 8);
            break;
        }
        // Global memory (emu_pipes.h): the same happens-before rule over GM bytes.
        case 48: {  // a GM -> UB copy of bytes the previous UB -> GM copy writes, with no MTE3_MTE2
            // (kv_compress's pooling reads back what its group reduction wrote: it syncs MTE3_MTE2)
            TPipe pipe;
            TBuf<TPosition::VECCALC> a;
            pipe.InitBuffer(a, 1024);
            Duplicate(a.Get<float>(), 1.0f, 64);
            SetFlag<HardEvent::V_MTE3>(0);
            WaitFlag<HardEvent::V_MTE3>(0);
            DataCopy(t.Out(), a.Get<float>(), 64);
            DataCopy(a.Get<float>()[64], t.Out()[8], 8);
            break;
        }
        case 49: {  // run on two cores: both write the same GM bytes in one launch
            TPipe pipe;
            TBuf<TPosition::VECOUT> a;
            pipe.InitBuffer(a, 256);
            Duplicate(a.Get<float>(), (float)GetBlockIdx(), 8);
            SetFlag<HardEvent::V_MTE3>(0);
            WaitFlag<HardEvent::V_MTE3>(0);
            DataCopy(t.Out(), a.Get<float>(), 8);
            break;
        }
        case 104: {  // the synchronised forms of 26-30 and 48 pass; DataCopyPad's fill of a partial block
            TPipe pipe;
            TQue<TPosition::VECIN, 1> in;
            TQue<TPosition::VECOUT, 1> out;
            TBuf<TPosition::VECCALC> a, m, o;
            pipe.InitBuffer(in, 1, 256);
            pipe.InitBuffer(out, 1, 256);
            pipe.InitBuffer(a, 256);
            pipe.InitBuffer(m, 64);
            pipe.InitBuffer(o, 256);
            // 5 floats, padding value -inf, padding counts 0 (kv_compress's LoadScores before the fix):
            // out[0..8) shows what fills the rest of the 32-byte block.
            LocalTensor<float> x = in.AllocTensor<float>();
            DataCopyPad(x, t.In()[3], DataCopyExtParams(1, 5 * sizeof(float), 0, 0, 0),
                        DataCopyPadExtParams<float>(true, 0, 0, -INFINITY));
            in.EnQue(x);
            x = in.DeQue<float>();
            LocalTensor<float> y = out.AllocTensor<float>();
            Adds(y, x, 0.0f, 8);
            PipeBarrier<PIPE_V>();
            Muls(y[8], y, 1.0f, 8);
            in.FreeTensor(x);
            Duplicate(m.Get<uint32_t>(), 0x5u, 8);
            PipeBarrier<PIPE_V>();
            uint64_t cnt = 0;
            GatherMask(o.Get<float>(), y, m.Get<uint32_t>(), true, 8, GatherMaskParams(1, 1, 0, 0), cnt);
            SetFlag<HardEvent::V_S>(0);
            WaitFlag<HardEvent::V_S>(0);
            y.SetValue(16, (float)cnt);  // 2: elements 0 and 2
            SetFlag<HardEvent::S_V>(0);
            WaitFlag<HardEvent::S_V>(0);
            out.EnQue(y);
            y = out.DeQue<float>();
            DataCopy(t.Out(), y, 24);
            SetFlag<HardEvent::MTE3_S>(0);
            WaitFlag<HardEvent::MTE3_S>(0);
            y.SetValue(0, 2.0f);
            out.FreeTensor(y);
            // GM written by MTE3 and read back by MTE2: MTE3_MTE2 between them.
            SetFlag<HardEvent::MTE3_MTE2>(0);
            WaitFlag<HardEvent::MTE3_MTE2>(0);
            DataCopy(a.Get<float>(), t.Out(), 8);
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
    SetFlag<HardEvent::M_FIX>(0);
    WaitFlag<HardEvent::M_FIX>(0);
    Fixpipe(out, c.Get<float>(), fp);
    SetFlag<HardEvent::FIX_M>(0);  // the second product overwrites L0C once the first is out
    WaitFlag<HardEvent::FIX_M>(0);
    Mmad(c.Get<float>(), xl0.Get<half>(), zl0.Get<half>(), mp);
    SetFlag<HardEvent::M_FIX>(0);
    WaitFlag<HardEvent::M_FIX>(0);
    Fixpipe(out[512], c.Get<float>(), fp);
}

// The cube's buffers for the hazard cases: X 32×32 in L1 → L0A, Y 16×32 in L1 → L0B, C in L0C.
struct CubeBuffers {
    TPipe pipe;
    TBuf<TPosition::A1> xl1;
    TBuf<TPosition::B1> yl1;
    TBuf<TPosition::A2> xl0;
    TBuf<TPosition::B2> yl0;
    TBuf<TPosition::CO1> c;
    GlobalTensor<half> x, y;
    GlobalTensor<float> out;
    std::vector<half> h = std::vector<half>(2048);
    explicit CubeBuffers(const SelfTest& t) {
        for (int i = 0; i < 2048; i++) h[i] = half(t.in[i]);
        x.SetGlobalBuffer(h.data(), 1024);
        y.SetGlobalBuffer(h.data() + 1024, 512);
        out.SetGlobalBuffer(t.out, 1024);
        pipe.InitBuffer(xl1, 2048);
        pipe.InitBuffer(yl1, 1024);
        pipe.InitBuffer(xl0, 2048);
        pipe.InitBuffer(yl0, 1024);
        pipe.InitBuffer(c, 2048);
    }
    void CopyIn() {
        DataCopy(xl1.Get<half>(), x, Nd2NzParams(1, 32, 32, 0, 32, 32, 1, 0));
        DataCopy(yl1.Get<half>(), y, Nd2NzParams(1, 16, 32, 0, 32, 16, 1, 0));
        SetFlag<HardEvent::MTE2_MTE1>(0);
        WaitFlag<HardEvent::MTE2_MTE1>(0);
    }
    void Load() {
        for (int mb = 0; mb < 2; mb++) {
            LoadData2DParams lp;
            lp.startIndex = mb;
            lp.repeatTimes = 2;
            lp.srcStride = 2;
            LoadData(xl0.Get<half>()[mb * 2 * 256], xl1.Get<half>(), lp);
        }
        LoadData2DParams yp;
        yp.repeatTimes = 2;
        yp.srcStride = 1;
        LoadData(yl0.Get<half>(), yl1.Get<half>(), yp);
        SetFlag<HardEvent::MTE1_M>(0);
        WaitFlag<HardEvent::MTE1_M>(0);
    }
    void Multiply(uint16_t m) {
        MmadParams mp;
        mp.m = m;
        mp.n = 16;
        mp.k = 32;
        Mmad(c.Get<float>(), xl0.Get<half>(), yl0.Get<half>(), mp);
    }
    void Out(uint16_t m) {
        SetFlag<HardEvent::M_FIX>(0);
        WaitFlag<HardEvent::M_FIX>(0);
        FixpipeParamsV220 fp;
        fp.nSize = 16;
        fp.mSize = m;
        fp.srcStride = 32;
        fp.dstStride = 16;
        Fixpipe(out, c.Get<float>(), fp);
    }
};

}  // namespace

extern "C" void ek_emu_selftest_cube(uint8_t* sync, uint8_t* which) {
    const SelfTest& t = *reinterpret_cast<const SelfTest*>(which);
    if (t.code != 47) KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_MIX_AIC_1_2);
    if (t.code != 45) SetSyncBaseAddr(t.code == 46 ? reinterpret_cast<uint64_t>(which) : reinterpret_cast<uint64_t>(sync));
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
        // The cube's write-after-read hazards (catlass's pingpong block pairs MTE1_MTE2, M_MTE1 and
        // FIX_M events per buffer for exactly these).
        case 42: {  // Mmad overwrites L0C while Fixpipe may still drain it (no FIX_M)
            if (ASCEND_IS_AIV) return;
            CubeBuffers b(t);
            b.CopyIn();
            b.Load();
            b.Multiply(32);
            b.Out(32);
            b.Multiply(32);
            break;
        }
        case 43: {  // LoadData overwrites L0B while Mmad may still read it (no M_MTE1)
            if (ASCEND_IS_AIV) return;
            CubeBuffers b(t);
            b.CopyIn();
            b.Load();
            b.Multiply(32);
            b.Load();
            b.Out(32);
            break;
        }
        case 44: {  // a GM -> L1 copy over what LoadData may still read (no MTE1_MTE2)
            if (ASCEND_IS_AIV) return;
            CubeBuffers b(t);
            b.CopyIn();
            b.Load();
            DataCopy(b.yl1.Get<half>(), b.y, Nd2NzParams(1, 16, 32, 0, 32, 16, 1, 0));
            b.Multiply(32);
            b.Out(32);
            break;
        }
        case 45:  // a cross-core flag before SetSyncBaseAddr
        case 46:  // SetSyncBaseAddr with an address that is not the hardware's
            if (ASCEND_IS_AIC) {
                CrossCoreSetFlag<2, PIPE_FIX>(1);
            } else {
                CrossCoreWaitFlag(1);
            }
            break;
        case 47:  // a mixed kernel without KERNEL_TASK_TYPE_DEFAULT
            break;
        // Global memory across the AI core's cores: a cross-core flag publishes what its pipe has
        // done (CrossCoreSetFlag page: the set is an instruction of that pipe).
        case 48: {  // the AIC sets the flag on MTE2, not on FIX after its Fixpipe: the AIVs may read early
            if (ASCEND_IS_AIC) {
                CubeBuffers b(t);
                b.CopyIn();
                b.Load();
                b.Multiply(32);
                b.Out(32);
                CrossCoreSetFlag<2, PIPE_MTE2>(1);
            } else {
                TPipe pipe;
                TBuf<TPosition::VECIN> a;
                pipe.InitBuffer(a, 1024);
                GlobalTensor<float> out;
                out.SetGlobalBuffer(t.out, 1024);
                CrossCoreWaitFlag(1);
                DataCopy(a.Get<float>(), out, 16);
            }
            break;
        }
        case 49: {  // the AIVs release the slot with a flag on MTE3, not on MTE2 after their reads:
                    // the AIC's Fixpipe may overwrite it while they still read
            if (ASCEND_IS_AIC) {
                CubeBuffers b(t);
                b.CopyIn();
                b.Load();
                b.Multiply(32);
                CrossCoreWaitFlag(1);
                b.Out(32);
            } else {
                TPipe pipe;
                TBuf<TPosition::VECIN> a;
                pipe.InitBuffer(a, 1024);
                GlobalTensor<float> out;
                out.SetGlobalBuffer(t.out, 1024);
                DataCopy(a.Get<float>(), out[GetSubBlockIdx() * 16], 16);
                CrossCoreSetFlag<2, PIPE_MTE3>(1);
            }
            break;
        }
        case 201: {  // Mmad with m = 1 (GEMV mode): out[0..16) = (first 32 elements of L0A)·Yᵀ
            if (ASCEND_IS_AIV) return;
            CubeBuffers b(t);
            b.CopyIn();
            b.Load();
            b.Multiply(1);
            b.Out(1);
            break;
        }
        case 200:
            CubeSemantics(t);
            break;
        default:
            EmuFail("unknown mixed self test");
    }
}

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
};

void Correct(const SelfTest& t) {
    TPipe pipe;
    TQue<TPosition::VECIN, 1> in;
    TQue<TPosition::VECOUT, 1> out;
    TBuf<TPosition::VECCALC> tmp;
    pipe.InitBuffer(in, 1, 256 * sizeof(float));
    pipe.InitBuffer(out, 1, 256 * sizeof(float));
    pipe.InitBuffer(tmp, 256 * sizeof(float));
    GlobalTensor<float> src, dst;
    src.SetGlobalBuffer(t.in, 512);
    dst.SetGlobalBuffer(t.out, 512);
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
    GlobalTensor<float> src, dst;
    src.SetGlobalBuffer(t.in, 512);
    dst.SetGlobalBuffer(t.out, 512);
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
    GlobalTensor<float> src, dst;
    src.SetGlobalBuffer(t.in, 512);
    dst.SetGlobalBuffer(t.out, 512);
    LocalTensor<float> s = sc.Get<float>(), x = a.Get<float>(), y = b.Get<float>();
    LocalTensor<uint32_t> i = ix.Get<uint32_t>();
    DataCopy(s, src, 64);
    for (uint32_t k = 0; k < 64; k++) i.SetValue(k, k);
    Sort32(x, s, i, 2);
    const uint16_t len[4] = {32, 32, 0, 0};
    MrgSort(y, MrgSortSrcList<float>(x, x[64], x, x), MrgSort4Info(len, false, 0x3, 1));
    DataCopy(dst, y, 128);
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
            GlobalTensor<float> src;
            src.SetGlobalBuffer(t.in, 512);
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
        case 100:
            Level0(t);
            break;
        case 101:
            SortSemantics(t);
            break;
        default:
            EmuFail("unknown self test");
    }
}

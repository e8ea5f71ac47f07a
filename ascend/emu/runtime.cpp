// The emulator's state and entry points (see include/kernel_operator.h).

#include "kernel_operator.h"

#include <cstdio>

namespace AscendC {

namespace {
thread_local CoreState* g_core = nullptr;
}

[[noreturn]] void EmuFail(const std::string& what) { throw EmuError(what); }

CoreState& Core() {
    if (!g_core) EmuFail("an Ascend C call outside a kernel launch");
    return *g_core;
}

// IEEE binary16 from f32, round to nearest even.
half::half(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) {
        bits = (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
        return;
    }
    if (ax >= 0x477ff000u) {  // rounds past 65504
        bits = (uint16_t)(sign | 0x7c00u);
        return;
    }
    if (ax < 0x38800000u) {  // subnormal or zero in f16
        const float a = std::fabs(f) * 16777216.0f;  // scale by 2^24: the f16 subnormal unit becomes 1
        const uint32_t m = (uint32_t)std::nearbyint(a);
        bits = (uint16_t)(sign | m);
        return;
    }
    const uint32_t e = ((ax >> 23) - 112) << 10;
    const uint32_t m = ax & 0x7fffffu;
    uint32_t h = e | (m >> 13);
    const uint32_t rest = m & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
    bits = (uint16_t)(sign | h);
}

half::operator float() const {
    const uint32_t sign = (uint32_t)(bits & 0x8000u) << 16;
    const uint32_t e = (bits >> 10) & 0x1fu, m = bits & 0x3ffu;
    uint32_t x;
    if (e == 0) {
        const float v = (float)m / 16777216.0f;
        std::memcpy(&x, &v, 4);
        x |= sign;
    } else if (e == 31) {
        x = sign | 0x7f800000u | (m << 13);
    } else {
        x = sign | ((e + 112) << 23) | (m << 13);
    }
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

Memory MemoryOf(TPosition p) {
    switch (p) {
        case TPosition::VECIN:
        case TPosition::VECOUT:
        case TPosition::VECCALC:
        case TPosition::CO2:
            return Memory::UB;
        case TPosition::A1:
        case TPosition::B1:
        case TPosition::C1:
            return Memory::L1;
        case TPosition::A2:
            return Memory::L0A;
        case TPosition::B2:
            return Memory::L0B;
        case TPosition::CO1:
        case TPosition::C2:
            return Memory::L0C;
        default:
            EmuFail("no local memory behind this position");
    }
}

const char* MemoryName(Memory m) {
    static const char* names[] = {"UB", "L1", "L0A", "L0B", "L0C"};
    return names[(int)m];
}

uint32_t MemoryCapacity(Memory m) {
    static const uint32_t cap[] = {192 * 1024, 512 * 1024, 64 * 1024, 64 * 1024, 128 * 1024};
    return cap[(int)m];
}

uint32_t Allocate(TPosition pos, uint32_t bytes, uint32_t count, bool queue) {
    CoreState& c = Core();
    if (!c.pipe_exists) EmuFail("InitBuffer without a TPipe");
    const Memory m = MemoryOf(pos);
    const uint64_t need = (uint64_t)bytes * count;
    if (c.used[(int)m] + need > MemoryCapacity(m))
        EmuFail(std::string(MemoryName(m)) + " overflow: InitBuffer of " + std::to_string(need) + " bytes with " +
                std::to_string(c.used[(int)m]) + " of " + std::to_string(MemoryCapacity(m)) + " already in use");
    const uint32_t off = c.used[(int)m];
    c.used[(int)m] += (uint32_t)need;
    c.buffers += count;
    if (c.buffers > 64) EmuFail("more than 64 InitBuffer blocks in one kernel");
    if (queue) {
        c.que_buffers[(int)pos] += count;
        if (c.que_buffers[(int)pos] > 8) EmuFail("more than 8 queue buffers on one position");
    }
    return off;
}

TPipe::TPipe() {
    CoreState& c = Core();
    if (c.pipe_exists) EmuFail("a kernel may create only one TPipe");
    c.pipe_exists = true;
}
TPipe::~TPipe() {}

int64_t GetBlockIdx() { return Core().block_idx; }
int64_t GetBlockNum() { return Core().block_num; }

}  // namespace AscendC

namespace ekemu {

void RunCores(uint32_t block_dim, void (*body)(void*), void* ctx) {
    using namespace AscendC;
    if (block_dim == 0) EmuFail("launch with zero cores");
    for (uint32_t i = 0; i < block_dim; i++) {
        CoreState st;
        st.block_idx = i;
        st.block_num = block_dim;
        for (int m = 0; m < (int)Memory::COUNT; m++) st.mem[m].assign(MemoryCapacity((Memory)m), 0xff);
        g_core = &st;
        try {
            body(ctx);
            for (auto& kv : st.flags)
                if (kv.second > 0)
                    EmuFail("SetFlag on event " + std::to_string(kv.first.first) + " id " + std::to_string(kv.first.second) +
                            " was never waited for");
            if (!st.leaks.empty()) EmuFail(st.leaks.front());
        } catch (const EmuError& e) {
            g_core = nullptr;
            throw EmuError("core " + std::to_string(i) + ": " + e.what());
        }
        g_core = nullptr;
    }
}

}  // namespace ekemu

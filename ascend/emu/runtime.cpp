// The emulator's state and entry points (see include/kernel_operator.h).

#include "kernel_operator.h"

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <thread>

namespace AscendC {

namespace {
thread_local CoreState* g_core = nullptr;
}

[[noreturn]] void EmuFail(const std::string& what) { throw EmuError(what); }

namespace {
std::atomic<uint64_t> g_counts[(int)Count::N];
}

void AddCount(Count c, uint64_t n) { g_counts[(int)c].fetch_add(n, std::memory_order_relaxed); }

// Counters since the last reset (`reset` nonzero: read and clear), for the Rust side.
extern "C" void ek_emu_counters(uint64_t* out, size_t n, int reset) {
    for (size_t i = 0; i < n && i < (size_t)Count::N; i++) out[i] = reset ? g_counts[i].exchange(0) : g_counts[i].load();
}

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
    // A2 splits the AI core: the AIC owns L1/L0A/L0B/L0C, each AIV its UB.
    if (c.cube && m == Memory::UB) EmuFail("InitBuffer of UB on a cube core (the AIC has no unified buffer)");
    if (!c.cube && m != Memory::UB)
        EmuFail(std::string("InitBuffer of ") + MemoryName(m) + " on a vector core (the AIV has only the unified buffer)");
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
int64_t GetSubBlockIdx() { return Core().sub_block; }
int64_t GetSubBlockNum() { return Core().cube ? 1 : 2; }

// The flag counters of one AIC + 2 AIV group. to_aiv[k][id]: sets by the AIC not yet waited for
// by AIV k; to_aic[k][id]: sets by AIV k not yet waited for by the AIC.
struct CrossCoreGroup {
    std::mutex mu;
    std::condition_variable cv;
    int to_aiv[2][16] = {};
    int to_aic[2][16] = {};
    // What each pending set carries: the clock of its pipe when it was issued (emu_pipes.h).
    std::deque<emu::Clock> clk_aiv[2][16], clk_aic[2][16];
    int live = 3, waiting = 0;
    int waits_on[3] = {-1, -1, -1};  // flag id each core (AIC, AIV 0, AIV 1) is blocked on
    bool aborted = false;

    bool Ready(int core, int id) const {
        return core == 0 ? to_aic[0][id] > 0 && to_aic[1][id] > 0 : to_aiv[core - 1][id] > 0;
    }
    // Every live core is blocked and none of their flags can be taken: nothing will ever set one.
    bool Deadlocked() const {
        if (waiting < live) return false;
        for (int c = 0; c < 3; c++)
            if (waits_on[c] >= 0 && Ready(c, waits_on[c])) return false;
        return true;
    }
};

namespace {
// A2 takes flag ids 0..10 (the current API reference; an older page said 0..15).
void CheckFlagId(int32_t id) {
    if (id < 0 || id > 10) EmuFail("cross-core flag id " + std::to_string(id) + " outside 0..10");
}
CrossCoreGroup& Group() {
    CoreState& c = Core();
    if (!c.group) EmuFail("cross-core flags outside a mixed (cube + vector) launch");
    return *c.group;
}
}  // namespace

namespace {
// The emulated device's hardware synchronisation address (what aclrtGetHardwareSyncAddr returns).
alignas(64) uint8_t g_hardware_sync[64];
uint64_t HardwareSyncAddr() { return reinterpret_cast<uint64_t>(g_hardware_sync); }
void CheckSyncBase(const char* what) {
    if (Core().sync_base == 0)
        EmuFail(std::string(what) + " before SetSyncBaseAddr: the flags' address was never given to this core "
                                    "(pass aclrtGetHardwareSyncAddr's address to the kernel)");
}
}  // namespace

void SetSyncBaseAddr(uint64_t config) {
    if (config != HardwareSyncAddr())
        EmuFail("SetSyncBaseAddr(" + std::to_string(config) + ") is not the device's hardware sync address (aclrtGetHardwareSyncAddr)");
    Core().sync_base = config;
}

void DeclareTaskType(KernelMetaType type) { Core().task_type = (int)type; }

void CrossCoreSet(int mode, int32_t id, int pipe) {
    CheckFlagId(id);
    CheckSyncBase("CrossCoreSetFlag");
    if (mode != 2) EmuFail("cross-core flag mode " + std::to_string(mode) + " is not emulated (mode 2: AIC with its AIVs)");
    CoreState& c = Core();
    CrossCoreGroup& g = Group();
    std::lock_guard<std::mutex> lock(g.mu);
    // A flag's counter holds at most 15 pending sets (the API reference's limit).
    constexpr int kMaxPending = 15;
    const emu::Clock done = c.pipes.Release(pipe);
    if (c.cube) {
        for (int k = 0; k < 2; k++) {
            if (++g.to_aiv[k][id] > kMaxPending) EmuFail("CrossCoreSetFlag " + std::to_string(id) + ": more than 15 sets pending");
            g.clk_aiv[k][id].push_back(done);
        }
    } else {
        if (++g.to_aic[c.sub_block][id] > kMaxPending) EmuFail("CrossCoreSetFlag " + std::to_string(id) + ": more than 15 sets pending");
        g.clk_aic[c.sub_block][id].push_back(done);
    }
    g.cv.notify_all();
}

void CrossCoreWait(int32_t id) {
    CheckFlagId(id);
    CheckSyncBase("CrossCoreWaitFlag");
    CoreState& c = Core();
    CrossCoreGroup& g = Group();
    std::unique_lock<std::mutex> lock(g.mu);
    const int me = c.cube ? 0 : 1 + (int)c.sub_block;
    g.waiting++;
    g.waits_on[me] = id;
    while (!g.Ready(me, id)) {
        if (g.aborted || g.Deadlocked()) {
            const bool first = !g.aborted;
            g.aborted = true;
            g.waiting--;
            g.waits_on[me] = -1;
            g.cv.notify_all();
            if (!first) EmuFail("aborted: another core of the group failed");
            EmuFail("CrossCoreWaitFlag " + std::to_string(id) + " can never be satisfied: every core of the group is waiting (deadlock)");
        }
        g.cv.wait(lock);
    }
    g.waiting--;
    g.waits_on[me] = -1;
    // Everything after the wait starts after what the sets it takes carry (CrossCoreWaitFlag page:
    // every later instruction is held).
    emu::Clock seen;
    const auto take = [&](std::deque<emu::Clock>& q) {
        seen.Join(q.front());
        q.pop_front();
    };
    if (c.cube) {
        g.to_aic[0][id]--;
        g.to_aic[1][id]--;
        take(g.clk_aic[0][id]);
        take(g.clk_aic[1][id]);
    } else {
        g.to_aiv[c.sub_block][id]--;
        take(g.clk_aiv[c.sub_block][id]);
    }
    c.pipes.AcquireAll(seen);
}

}  // namespace AscendC

extern "C" uint64_t ek_emu_hardware_sync_addr() { return AscendC::HardwareSyncAddr(); }

namespace ekemu {

namespace {
// Runs `body` as core `st` on this thread; returns the first rule broken ("" if none).
std::string RunOne(AscendC::CoreState& st, void (*body)(void*), void* ctx) {
    using namespace AscendC;
    for (int m = 0; m < (int)Memory::COUNT; m++) {
        const bool mine = st.cube ? m != (int)Memory::UB : m == (int)Memory::UB;
        if (mine) st.mem[m].assign(MemoryCapacity((Memory)m), 0xff);
    }
    uint32_t capacity[(int)Memory::COUNT];
    bool owned[(int)Memory::COUNT];
    for (int m = 0; m < (int)Memory::COUNT; m++) {
        capacity[m] = MemoryCapacity((Memory)m);
        owned[m] = !st.mem[m].empty();
    }
    st.pipes.Reset(capacity, owned, st.group ? (st.cube ? 0 : 1 + (int)st.sub_block) : 0);
    g_core = &st;
    std::string err;
    try {
        body(ctx);
        for (auto& kv : st.flags)
            if (kv.second > 0)
                EmuFail("SetFlag on event " + emu::EventName((HardEvent)kv.first.first) + " id " + std::to_string(kv.first.second) +
                        " was never waited for");
        if (!st.leaks.empty()) EmuFail(st.leaks.front());
        if (st.remain_seq) emu::RemainCountUnsynced("the end of the kernel");
        if (st.group && st.task_type != KERNEL_TYPE_MIX_AIC_1_2)
            EmuFail("a mixed launch of a kernel that does not declare KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_MIX_AIC_1_2)");
    } catch (const EmuError& e) {
        err = e.what();
    }
    g_core = nullptr;
    return err;
}
}  // namespace

void RunCores(uint32_t block_dim, void (*body)(void*), void* ctx) {
    using namespace AscendC;
    if (block_dim == 0) EmuFail("launch with zero cores");
    emu::GmShadow gm;  // one launch's global-memory accesses: the cores of a launch run concurrently
    for (uint32_t i = 0; i < block_dim; i++) {
        CoreState st;
        st.block_idx = i;
        st.block_num = block_dim;
        st.gm = &gm;
        st.gm_group = i;
        const std::string err = RunOne(st, body, ctx);
        if (!err.empty()) throw EmuError("core " + std::to_string(i) + ": " + err);
    }
}

void RunMixCores(uint32_t block_dim, void (*body)(void*), void* ctx) {
    using namespace AscendC;
    if (block_dim == 0) EmuFail("launch with zero cores");
    emu::GmShadow gm;
    for (uint32_t i = 0; i < block_dim; i++) {
        CrossCoreGroup group;
        CoreState st[3];
        std::string err[3];
        for (int k = 0; k < 3; k++) {
            // In a 1:2 mixed launch the AIC sees block index i, its AIVs 2i and 2i + 1.
            st[k].block_idx = k == 0 ? i : 2 * i + (k - 1);
            st[k].block_num = block_dim;
            st[k].cube = k == 0;
            st[k].sub_block = k == 0 ? 0 : k - 1;
            st[k].group = &group;
            st[k].gm = &gm;
            st[k].gm_group = i;
        }
        std::thread workers[3];
        for (int k = 0; k < 3; k++) {
            workers[k] = std::thread([&, k] {
                err[k] = RunOne(st[k], body, ctx);
                std::lock_guard<std::mutex> lock(group.mu);
                group.live--;
                if (!err[k].empty()) group.aborted = true;
                group.cv.notify_all();
            });
        }
        for (auto& w : workers) w.join();
        static const char* names[3] = {"AIC", "AIV 0", "AIV 1"};
        // Report the root cause first: a failure other than the abort it caused elsewhere.
        std::string all;
        for (int pass = 0; pass < 2; pass++)
            for (int k = 0; k < 3; k++)
                if (!err[k].empty() && (pass == 1) == (err[k].find("aborted:") != std::string::npos))
                    all += (all.empty() ? "" : "; ") + ("core " + std::to_string(i) + " " + names[k] + ": " + err[k]);
        if (!all.empty()) throw EmuError(all);
        for (int k = 0; k < 2; k++)
            for (int id = 0; id < 16; id++) {
                if (group.to_aiv[k][id] > 0)
                    throw EmuError("core " + std::to_string(i) + ": AIC's CrossCoreSetFlag " + std::to_string(id) + " never waited for by AIV " + std::to_string(k));
                if (group.to_aic[k][id] > 0)
                    throw EmuError("core " + std::to_string(i) + ": AIV " + std::to_string(k) + "'s CrossCoreSetFlag " + std::to_string(id) + " never waited for by the AIC");
            }
    }
}

}  // namespace ekemu

// Host emulation of the CUDA execution model the kernels of cuda/ use (tests only): a launch runs
// its blocks one after another; a block's threads are fibers on the calling OS thread,
// switched only at __syncthreads and warp collectives, so a launch is deterministic.
//
// Semantics kept from the CUDA programming guide / PTX ISA:
// - __syncthreads: every thread of the block must reach the same barrier; a thread that exits
//   while others wait, or a barrier nobody can complete, is reported (the hardware would hang or
//   misbehave) instead of passing.
// - Warp collectives (__shfl_xor_sync, __ballot_sync, __syncwarp, mma.sync, ldmatrix): the full
//   mask only; all 32 lanes must arrive at the same collective, else it is reported.
// - mma.sync.m16n8k16.row.col with f32 accumulators: the PTX fragment layouts (A: 4 registers of
//   16-bit pairs, rows g / g + 8 and columns 2t / 2t + 8; B: 2 registers, k rows 2t / 2t + 8,
//   column g; C: rows g / g + 8, columns 2t, 2t + 1; g = lane / 4, t = lane % 4).
// - Dynamic shared memory is exactly the launch's size, poisoned (0xFF bytes: NaN floats) per
//   block, so reads of unwritten shared memory show up as wrong results; a write into the guard
//   bytes past its end is reported (the hardware would fault or corrupt a neighbour).
// - A fiber runs until it reaches a barrier or a collective, in a switchable resume order (round
//   robin or greedy, by index, reversed or shuffled): a shared-memory race whose outcome decides
//   a result shows up as different bits under different orders.
// - cp.async: copies land when a wait retires their group, or (optionally) at issue — the two
//   extremes the hardware allows — so reading before the wait, or refilling a buffer other
//   threads still read, shows up; a thread exiting with copies in flight is reported.
// - Global vector loads (`ld_global_16` / `ld_global_elem` in cuda/common.cuh) must be aligned to their size, as the
//   hardware requires; they are counted. (Global memory itself, its guard bytes and the
//   inaccessible page after each allocation, are the driver double's: driver_emu.cpp.)
// Not emulated: true concurrency (a race needing an interleaving none of the orders produces goes
// unseen), memory-model effects, timing. A violation throws `ekemu::Violation` inside the fiber;
// `launch` returns its text.
#pragma once

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#define EK_CUDA_HOST 1
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static shared arrays: one per kernel instantiation, shared by the fibers of the OS thread.
#define __shared__ static thread_local

struct EkDim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local EkDim3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

namespace ekemu {

struct Violation : std::runtime_error {
    using std::runtime_error::runtime_error;
};

constexpr unsigned WARP = 32;
// Bytes a lane contributes to one collective (mma: four A registers and two B registers).
constexpr unsigned SLOT_BYTES = 24;
constexpr size_t STACK_BYTES = 256 * 1024;

enum class State { Run, AtBarrier, AtWarp, Done };
enum class Collective { Shfl, Ballot, Mma, SyncWarp, LdMatrix };

// A fiber's saved context. On x86-64 a ten-instruction switch (callee-saved registers, MXCSR and
// the x87 control word on the fiber's own stack; no signal-mask system call, unlike swapcontext,
// which made the emulator several times slower); elsewhere ucontext.
#if defined(__x86_64__)
struct Context {
    void* sp = nullptr;
};
extern "C" void ek_fiber_switch(void** save_sp, void* resume_sp);
// Local symbol (no .globl): each object that includes this header has its own copy.
asm(R"(
    .text
    .p2align 4
    .type ek_fiber_switch, @function
ek_fiber_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size ek_fiber_switch, .-ek_fiber_switch
)");
inline void switch_to(Context& save, Context& resume) { ek_fiber_switch(&save.sp, resume.sp); }
// A context that starts `entry` on `stack` (which must never return).
inline void start_context(Context& c, char* stack, size_t bytes, void (*entry)(), Context&) {
    auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15));
    *--top = 0;                                   // entry's (never used) return address
    *--top = reinterpret_cast<uint64_t>(entry);   // where the first switch "returns"
    for (int i = 0; i < 6; i++) *--top = 0;       // rbp rbx r12 r13 r14 r15
    --top;                                        // MXCSR and x87 control word: the current ones
    unsigned mxcsr;
    unsigned short fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    std::memcpy(top, &mxcsr, 4);
    std::memcpy(reinterpret_cast<char*>(top) + 4, &fpucw, 2);
    c.sp = top;
}
#else
struct Context {
    ucontext_t uc;
};
inline void switch_to(Context& save, Context& resume) { swapcontext(&save.uc, &resume.uc); }
inline void start_context(Context& c, char* stack, size_t bytes, void (*entry)(), Context& back) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = &back.uc;
    makecontext(&c.uc, entry, 0);
}
#endif

// One cp.async: `bytes` of `size` from src, the rest zero.
struct AsyncCopy {
    void* dst;
    const void* src;
    int size, bytes;
    void run() const {
        if (bytes) std::memcpy(dst, src, bytes);
        std::memset(static_cast<char*>(dst) + bytes, 0, size - bytes);
    }
};
// When cp.async copies land: at the wait that retires them (late: a read before the wait sees
// the old bytes) or at issue (early: a copy into a buffer others still read overwrites it). The
// hardware may do either; tests run both (`ek_cuda_emu_cp_async_early`).
inline std::atomic<bool> cp_async_early{false};

// Work counted across launches (warp-wide instructions once per warp): tensor-core work, the
// shared-memory fragment loads, bytes copied by cp.async, block barriers passed; and the driver
// calls a CUDA graph could not hold: allocations and host-to-device copies.
struct Counters {
    std::atomic<unsigned long long> mma{0}, ldmatrix{0}, cp_async_bytes{0}, barriers{0}, ld_global_bytes{0};
    std::atomic<unsigned long long> allocations{0}, htod_copies{0};
};
inline Counters counters;
// The order a block's fibers are resumed in: round robin by thread index (0) or reversed (1), or
// greedily — always the first runnable fiber, so it runs as far ahead of the others as the
// barriers let it — by index (2), reversed (3), or over a shuffle seeded by n ≥ 4 and the block.
// Running a kernel under several orders and comparing the bits finds shared-memory races whose
// outcome depends on which thread gets there first (a missing barrier between phases, say).
inline std::atomic<unsigned> schedule{0};

struct Fiber {
    Context ctx;
    std::vector<AsyncCopy> open_group;                  // cp.async issued since the last commit
    std::vector<std::vector<AsyncCopy>> groups;         // committed, oldest first
    std::unique_ptr<char[]> stack;
    EkDim3 tid;
    State state = State::Done;
    unsigned wait_gen = 0;
    unsigned collectives = 0;  // collectives this lane has entered (picks the slot phase)
};

struct Warp {
    unsigned arrived = 0, gen = 0, lanes = 0;
    Collective kind[2][WARP];
    unsigned char slot[2][WARP][SLOT_BYTES];
};

struct Block {
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    Context scheduler;
    unsigned current = 0, arrived = 0, gen = 0;
    const std::function<void()>* body = nullptr;
    std::string error;
};

inline thread_local Block* block = nullptr;
inline thread_local unsigned char* dynamic_shared = nullptr;

inline Fiber& me() { return block->fibers[block->current]; }
inline unsigned linear(const EkDim3& t) { return (t.z * blockDim.y + t.y) * blockDim.x + t.x; }

[[noreturn]] inline void fail(const std::string& what) {
    throw Violation("block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                    std::to_string(blockIdx.z) + ") thread " + std::to_string(linear(threadIdx)) + ": " + what);
}

inline void yield() { switch_to(me().ctx, block->scheduler); }

inline void fiber_main() {
    Fiber& f = me();
    try {
        (*block->body)();
        if (block->arrived > 0) fail("exited while other threads of its block wait at __syncthreads");
        if (!f.open_group.empty() || !f.groups.empty()) fail("exited with cp.async copies never waited for");
    } catch (const Violation& v) {
        if (block->error.empty()) block->error = v.what();
    }
    f.state = State::Done;
    switch_to(f.ctx, block->scheduler);  // never resumed
}

inline void syncthreads() {
    Block& b = *block;
    const unsigned gen = b.gen;
    if (++b.arrived == b.fibers.size()) {
        b.arrived = 0;
        b.gen++;
        counters.barriers++;
        return;
    }
    me().state = State::AtBarrier;
    me().wait_gen = gen;
    yield();
}

// Deposits this lane's bytes for a collective of `kind`, waits for the whole warp, and returns
// the phase whose slots hold every lane's bytes (valid until this lane's next collective).
inline unsigned warp_arrive(Collective kind, unsigned mask, const void* bytes, size_t n) {
    if (mask != 0xffffffffu) fail("warp collective with a partial mask (only the full mask is emulated)");
    const unsigned t = linear(threadIdx), lane = t % WARP;
    Warp& w = block->warps[t / WARP];
    if (w.lanes != WARP) fail("warp collective in a partial warp");
    Fiber& f = me();
    const unsigned phase = f.collectives++ & 1;
    if (n) std::memcpy(w.slot[phase][lane], bytes, n);
    w.kind[phase][lane] = kind;
    const unsigned gen = w.gen;
    if (++w.arrived == WARP) {
        for (unsigned l = 0; l < WARP; l++)
            if (w.kind[phase][l] != kind) fail("lanes of one warp at different collectives");
        if (kind == Collective::Mma) counters.mma++;
        if (kind == Collective::LdMatrix) counters.ldmatrix++;
        w.arrived = 0;
        w.gen++;
        return phase;
    }
    f.state = State::AtWarp;
    f.wait_gen = gen;
    yield();
    return phase;
}

inline Warp& my_warp() { return block->warps[linear(threadIdx) / WARP]; }

inline void cp_async(void* dst, const void* src, int size, int bytes) {
    if (bytes < 0 || bytes > size) fail("cp.async source size outside 0..cp-size");
    if (reinterpret_cast<uintptr_t>(dst) % size || (bytes && reinterpret_cast<uintptr_t>(src) % size))
        fail("cp.async address not aligned to its size");
    const AsyncCopy c{dst, src, size, bytes};
    counters.cp_async_bytes += bytes;
    if (cp_async_early) c.run();
    else me().open_group.push_back(c);
}
// A load of `size` bytes from global memory through `ld_global_16` / `ld_global_elem` (cuda/common.cuh): aligned to its
// size, as the hardware demands of vector loads; counted.
inline void ld_global(void* dst, const void* src, int size) {
    if (reinterpret_cast<uintptr_t>(src) % size) fail("global load of " + std::to_string(size) + " bytes not aligned to its size");
    counters.ld_global_bytes += size;
    std::memcpy(dst, src, size);
}
inline void cp_async_commit() {
    Fiber& f = me();
    f.groups.push_back(std::move(f.open_group));
    f.open_group.clear();
}
// Retires all but the `newer` most recent committed groups.
inline void cp_async_wait(int newer) {
    Fiber& f = me();
    while ((int)f.groups.size() > newer) {
        for (const AsyncCopy& c : f.groups.front()) c.run();
        f.groups.erase(f.groups.begin());
    }
}
inline unsigned my_lane() { return linear(threadIdx) % WARP; }

// Resumes runnable fibers round robin until the block is done, a violation, or a deadlock.
// (a switch restores every callee-saved register: GCC's setjmp-style clobber warning, raised for
// swapcontext, does not apply.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wclobbered"
inline void run_block(Block& b) {
    const unsigned n = b.fibers.size();
    // The order fibers are resumed in: a race-free kernel computes the same bits in any order.
    std::vector<unsigned> order(n);
    for (unsigned i = 0; i < n; i++) order[i] = i;
    const unsigned mode = schedule;
    const bool greedy = mode >= 2;  // always resume the first runnable fiber of `order`
    if (mode == 1 || mode == 3) std::reverse(order.begin(), order.end());
    if (mode >= 4) {
        uint64_t x = mode * 0x9E3779B97F4A7C15ull ^ (blockIdx.x + 1) * 0xBF58476D1CE4E5B9ull ^
                     (blockIdx.y + 1) * 0x94D049BB133111EBull ^ blockIdx.z;
        for (unsigned i = n; i > 1; i--) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            std::swap(order[i - 1], order[x % i]);
        }
    }
    for (;;) {
        bool moved = false, alive = false;
        for (unsigned k = 0; k < n && b.error.empty(); k++) {
            const unsigned i = order[k];
            Fiber& f = b.fibers[i];
            if (f.state == State::Done) continue;
            alive = true;
            if (f.state == State::AtBarrier && b.gen == f.wait_gen) continue;
            if (f.state == State::AtWarp && b.warps[i / WARP].gen == f.wait_gen) continue;
            f.state = State::Run;
            b.current = i;
            threadIdx = f.tid;
            switch_to(b.scheduler, f.ctx);
            moved = true;
            if (greedy) break;
        }
        if (!b.error.empty() || !alive) return;
        if (!moved) {
            unsigned at_bar = 0, at_warp = 0, done = 0;
            for (auto& f : b.fibers) (f.state == State::AtBarrier ? at_bar : f.state == State::AtWarp ? at_warp : done)++;
            b.error = "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                      std::to_string(blockIdx.z) + "): deadlock: " + std::to_string(at_bar) + " threads at __syncthreads, " +
                      std::to_string(at_warp) + " at warp collectives, " + std::to_string(done) + " exited";
            return;
        }
    }
}

// Runs `body` as a grid of `grid` blocks of `threads`; returns "" or the first violation.
inline std::string launch(EkDim3 grid, EkDim3 threads, size_t dynamic_bytes, const std::function<void()>& body) {
    const unsigned n = threads.x * threads.y * threads.z;
    if (n == 0 || n > 1024) return "block of " + std::to_string(n) + " threads (1..1024)";
    Block b;
    b.body = &body;
    b.fibers.resize(n);
    for (auto& f : b.fibers) f.stack.reset(new char[STACK_BYTES]);
    b.warps.resize((n + WARP - 1) / WARP);
    for (unsigned w = 0; w < b.warps.size(); w++) b.warps[w].lanes = std::min(WARP, n - w * WARP);
    // Guard bytes past the launch's dynamic shared memory: a write there is reported, a read
    // gets NaN-like bytes.
    constexpr size_t SMEM_GUARD = 1024;
    std::vector<unsigned char> smem(dynamic_bytes + 16 + SMEM_GUARD);
    // 16-byte aligned dynamic shared memory, like the hardware's.
    unsigned char* smem16 = smem.data() + (16 - reinterpret_cast<uintptr_t>(smem.data()) % 16) % 16;
    Block* outer = block;
    unsigned char* outer_smem = dynamic_shared;
    block = &b;
    dynamic_shared = smem16;
    gridDim = grid;
    blockDim = threads;
    for (unsigned bz = 0; bz < grid.z && b.error.empty(); bz++)
        for (unsigned by = 0; by < grid.y && b.error.empty(); by++)
            for (unsigned bx = 0; bx < grid.x && b.error.empty(); bx++) {
                blockIdx = EkDim3{bx, by, bz};
                std::memset(smem16, 0xff, dynamic_bytes + SMEM_GUARD);
                b.arrived = 0;
                for (auto& w : b.warps) w.arrived = 0;
                for (unsigned i = 0; i < n; i++) {
                    Fiber& f = b.fibers[i];
                    start_context(f.ctx, f.stack.get(), STACK_BYTES, fiber_main, b.scheduler);
                    f.tid = EkDim3{i % threads.x, (i / threads.x) % threads.y, i / (threads.x * threads.y)};
                    f.state = State::Run;
                    f.collectives = 0;
                    f.open_group.clear();
                    f.groups.clear();
                }
                run_block(b);
                for (size_t i = 0; i < SMEM_GUARD && b.error.empty(); i++)
                    if (smem16[dynamic_bytes + i] != 0xff)
                        b.error = "block (" + std::to_string(bx) + "," + std::to_string(by) + "," + std::to_string(bz) +
                                  "): wrote past the end of its " + std::to_string(dynamic_bytes) +
                                  " bytes of dynamic shared memory (at +" + std::to_string(i) + ")";
            }
    block = outer;
    dynamic_shared = outer_smem;
    return b.error;
}
#pragma GCC diagnostic pop

}  // namespace ekemu

inline void __syncthreads() { ekemu::syncthreads(); }

template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    static_assert(sizeof(T) <= ekemu::SLOT_BYTES);
    const unsigned phase = ekemu::warp_arrive(ekemu::Collective::Shfl, mask, &v, sizeof(T));
    T r;
    std::memcpy(&r, ekemu::my_warp().slot[phase][(ekemu::my_lane() ^ lane_mask) % ekemu::WARP], sizeof(T));
    return r;
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
    ekemu::warp_arrive(ekemu::Collective::SyncWarp, mask, nullptr, 0);
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
    const int p = pred != 0;
    const unsigned phase = ekemu::warp_arrive(ekemu::Collective::Ballot, mask, &p, sizeof(p));
    unsigned ballot = 0;
    for (unsigned l = 0; l < ekemu::WARP; l++) {
        int v;
        std::memcpy(&v, ekemu::my_warp().slot[phase][l], sizeof(v));
        ballot |= (unsigned)v << l;
    }
    return ballot;
}

// 16-bit float conversions (round to nearest even, as cvt.rn).
inline float ek_half_to_f32(unsigned short h) {
    _Float16 x;
    std::memcpy(&x, &h, 2);
    return (float)x;
}
inline unsigned short ek_f32_to_half(float f) {
    const _Float16 x = (_Float16)f;
    unsigned short h;
    std::memcpy(&h, &x, 2);
    return h;
}
inline float ek_bf16_to_f32(unsigned short h) {
    const unsigned u = (unsigned)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned short ek_f32_to_bf16(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// One warp-wide mma.sync.m16n8k16.row.col, f32 accumulators; `to_f32` converts a 16-bit element.
template <float (*to_f32)(unsigned short)>
inline void ek_mma_m16n8k16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
    const unsigned phase = ekemu::warp_arrive(ekemu::Collective::Mma, 0xffffffffu, mine, sizeof(mine));
    const auto& slot = ekemu::my_warp().slot[phase];
    auto reg = [&](unsigned lane, unsigned r) {
        uint32_t v;
        std::memcpy(&v, slot[lane] + 4 * r, 4);
        return v;
    };
    auto half = [&](uint32_t v, unsigned k) { return to_f32((unsigned short)(v >> (16 * (k & 1)))); };
    const unsigned lane = ekemu::my_lane(), g = lane / 4, t = lane % 4;
    for (unsigned e = 0; e < 4; e++) {
        const unsigned row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
        float acc = 0.f;
        for (unsigned k = 0; k < 16; k++) {
            const float x = half(reg((row % 8) * 4 + (k % 8) / 2, row / 8 + 2 * (k / 8)), k);
            const float y = half(reg(col * 4 + (k % 8) / 2, 4 + k / 8), k);
            acc += x * y;
        }
        c[e] += acc;
    }
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane l gives the address of row l % 8 of
// matrix l / 8 (16 bytes, 16-byte aligned); register i of lane t holds matrix i's elements
// (row t / 4, columns 2·(t % 4) and + 1), or with .trans (rows 2·(t % 4) and + 1, column t / 4),
// the lower column (row) in the low half.
template <bool TRANS> inline void ek_ldmatrix_x4(uint32_t* r, const void* row) {
    if (reinterpret_cast<uintptr_t>(row) % 16) ekemu::fail("ldmatrix row address not 16-byte aligned");
    const unsigned phase = ekemu::warp_arrive(ekemu::Collective::LdMatrix, 0xffffffffu, &row, sizeof(row));
    const auto& slot = ekemu::my_warp().slot[phase];
    const unsigned t = ekemu::my_lane();
    for (unsigned i = 0; i < 4; i++) {
        r[i] = 0;
        for (unsigned h = 0; h < 2; h++) {
            const unsigned rr = TRANS ? 2 * (t % 4) + h : t / 4, cc = TRANS ? t / 4 : 2 * (t % 4) + h;
            const unsigned short* base;
            std::memcpy(&base, slot[8 * i + rr], sizeof(base));
            r[i] |= (uint32_t)base[cc] << (16 * h);
        }
    }
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned atomicAdd(unsigned* a, unsigned v) {
    const unsigned old = *a;
    *a = old + v;
    return old;
}
// No float atomics: their order, and so the sum's last bits, would change from run to run on
// the hardware, and the decisions that depend on them with it (tests/cuda_compile.rs also checks
// the compiled PTX for float atom/red instructions).
inline unsigned atomicMax(unsigned* a, unsigned v) {
    const unsigned old = *a;
    *a = std::max(old, v);
    return old;
}
template <typename T> inline T __ldg(const T* p) { return *p; }
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int i) { return __uint_as_float((unsigned)i); }
inline long long __double_as_longlong(double d) {
    long long u;
    std::memcpy(&u, &d, 8);
    return u;
}
inline double __longlong_as_double(long long u) {
    double d;
    std::memcpy(&d, &u, 8);
    return d;
}
// Round-to-nearest intrinsics: plain IEEE operations (built with -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
// fma.rn.f32: one rounding (std::fma is correctly rounded: C++ [c.math], C11 7.12.13.1).
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __log2f(float x) { return std::log2(x); }
using std::max;
using std::min;

#define EK_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(ekemu::dynamic_shared)

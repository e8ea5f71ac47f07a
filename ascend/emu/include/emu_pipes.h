// The emulator's model of an AI core's asynchronous pipes, and the happens-before checker over it.
//
// What the hardware does (Ascend C programming guide, "hardware pipelines" and the pages of
// SetFlag/WaitFlag, PipeBarrier and TQue): the scalar unit issues each instruction into the queue
// of its pipe — S (scalar), V (vector, also L0C -> UB), M (cube), MTE1 (L1 -> L0A/L0B), MTE2
// (GM -> UB/L1), MTE3 (UB -> GM), FIX (L0C -> GM) — and the pipes run concurrently. Nothing orders
// an instruction after one of another pipe but a flag (SetFlag<X_Y> on X, WaitFlag<X_Y> on Y), a
// queue hand-off (TQue EnQue/DeQue and FreeTensor/AllocTensor insert those flags) or
// PipeBarrier<PIPE_ALL>. Within a pipe instructions run in order, except that dependent vector
// instructions need PipeBarrier<PIPE_V> between them (the PipeBarrier page's Add -> Mul example;
// with the compiler's automatic synchronisation off, which is what the kernels must survive).
//
// The model: each instruction gets (pipe, sequence number) and a vector clock — for every pipe,
// how many of its instructions are known complete before this one starts. Every local-memory
// byte range an instruction reads or writes is recorded per 32-byte block (last writer, last
// reader per pipe); an access conflicting with an earlier one (read after write, write after
// read or write) that the clock does not order before it is a race, reported with both
// instructions, the memory and the bytes. Values are computed at issue, as before: the checker
// only says when the hardware could have computed something else.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace AscendC {

enum class Memory : uint8_t { UB, L1, L0A, L0B, L0C, COUNT };

enum pipe_t { PIPE_S, PIPE_V, PIPE_M, PIPE_MTE1, PIPE_MTE2, PIPE_MTE3, PIPE_FIX, PIPE_ALL };

namespace emu {

constexpr int kPipes = PIPE_ALL;  // S, V, M, MTE1, MTE2, MTE3, FIX

const char* PipeName(int pipe);

// For each pipe, how many of its instructions are known complete.
struct Clock {
    uint32_t done[kPipes] = {};
    void Join(const Clock& o) {
        for (int p = 0; p < kPipes; p++)
            if (o.done[p] > done[p]) done[p] = o.done[p];
    }
};

// One issued instruction.
struct Op {
    int pipe = -1;
    uint32_t seq = 0;  // 1-based within its pipe
    Clock clk;         // what is complete before it starts
    const char* name = "";
    // Whether the instruction `seq` of `pipe` is complete before this one starts.
    bool After(int pipe_, uint32_t seq_) const {
        return seq_ == 0 || (pipe_ == pipe && seq_ == seq) || clk.done[pipe_] >= seq_;
    }
};

// Last accesses of one 32-byte block.
struct Shadow {
    uint32_t wseq = 0;
    uint8_t wpipe = 0;
    uint32_t rseq[kPipes] = {};
};

class PipeState {
public:
    // Fresh state for a core that owns the memories `owned` (bytes each; 0: not owned).
    void Reset(const uint32_t* capacity, const bool* owned);
    // Issues an instruction on `pipe`.
    Op Issue(int pipe, const char* name);
    // Records that `op` reads or writes bytes [lo, hi) of memory `m`; a race fails the core.
    void Access(const Op& op, Memory m, uint32_t lo, uint32_t hi, bool write);
    // The clock a flag set on `src` now carries: every issued `src` instruction and what they
    // waited for.
    Clock Release(int src) const;
    // `dst`'s next instructions start after what `c` says is complete.
    void Acquire(int dst, const Clock& c);
    // PipeBarrier<pipe>: later `pipe` instructions after every earlier one (PIPE_ALL: every pipe
    // after every earlier instruction).
    void Barrier(int pipe);
    // How many `pipe` instructions `dst`'s next instruction knows complete.
    uint32_t Known(int dst, int pipe) const { return front_[dst].done[pipe]; }
    // The instruction currently executing (the emulated API sets it around each instruction).
    Op current;

private:
    std::string Describe(int pipe, uint32_t seq) const;
    uint32_t count_[kPipes] = {};
    Clock front_[kPipes];
    std::vector<const char*> names_[kPipes];
    std::vector<Shadow> shadow_[(int)Memory::COUNT];
};

}  // namespace emu
}  // namespace AscendC

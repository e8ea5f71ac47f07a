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
//
// Global memory is checked the same way across the three cores of a mixed launch's AI core
// (slots: AIC, AIV 0, AIV 1), whose clocks span all three: CrossCoreSetFlag<mode, pipe> is issued
// on `pipe` (CrossCoreSetFlag page: "the pipe this instruction runs on"), so the flag carries what
// that pipe's earlier instructions completed, and CrossCoreWaitFlag holds every later instruction
// of the waiting core (CrossCoreWaitFlag page). Every GM byte range an instruction reads or writes
// is recorded exactly (GM has no 32-byte grid: DataCopyPad writes only its bytes); a conflicting
// access no chain of flags orders is a race — between the pipes of one core (e.g. a UB -> GM copy
// then a GM -> UB copy of the same bytes with no MTE3_MTE2), between the AIC and an AIV (a flag
// set on a pipe that does not cover the write, or a slot overwritten before its reader released
// it), and between different cores of one launch (nothing orders them inside a launch).
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace AscendC {

enum class Memory : uint8_t { UB, L1, L0A, L0B, L0C, COUNT };

enum pipe_t { PIPE_S, PIPE_V, PIPE_M, PIPE_MTE1, PIPE_MTE2, PIPE_MTE3, PIPE_FIX, PIPE_ALL };

namespace emu {

constexpr int kPipes = PIPE_ALL;  // S, V, M, MTE1, MTE2, MTE3, FIX
constexpr int kSlots = 3;         // the cores of a mixed launch's AI core: AIC, AIV 0, AIV 1 (a vector core: 0)

const char* PipeName(int pipe);

// For each pipe of each core of the AI core, how many of its instructions are known complete.
struct Clock {
    uint32_t done[kSlots * kPipes] = {};
    void Join(const Clock& o) {
        for (int p = 0; p < kSlots * kPipes; p++)
            if (o.done[p] > done[p]) done[p] = o.done[p];
    }
};

// One issued instruction.
struct Op {
    int pipe = -1;
    int slot = 0;      // the core that issued it
    uint32_t seq = 0;  // 1-based within its pipe
    Clock clk;         // what is complete before it starts
    const char* name = "";
    // Whether the instruction `seq` of `pipe` of core `slot_` is complete before this one starts.
    bool After(int slot_, int pipe_, uint32_t seq_) const {
        return seq_ == 0 || (slot_ == slot && pipe_ == pipe && seq_ == seq) || clk.done[slot_ * kPipes + pipe_] >= seq_;
    }
    bool After(int pipe_, uint32_t seq_) const { return After(slot, pipe_, seq_); }
};

// One access to global memory, as the GM shadow keeps it.
struct GmRef {
    uint32_t seq = 0;  // 0: none
    uint32_t group = 0;  // the AI core (mixed launch) or vector core that issued it
    uint8_t slot = 0, pipe = 0;
    const char* name = "";
};

// Every GM access of one launch: byte ranges [start, end) with their last writer and latest
// readers. Shared by the launch's cores (threads in a mixed launch), hence the lock.
class GmShadow {
public:
    // Records `op` (issued by core `slot` of `group`) reading or writing GM bytes [lo, hi); a race
    // fails the calling core.
    void Access(const Op& op, uint32_t group, uint64_t lo, uint64_t hi, bool write, bool mixed);

private:
    static constexpr int kReaders = 6;
    struct Segment {
        uint64_t end = 0;
        GmRef w;
        GmRef r[kReaders];
        uint8_t next = 0;  // the reader entry to replace when all are taken
    };
    std::mutex mu_;
    std::map<uint64_t, Segment> segs_;  // by start
};

// Last accesses of one 32-byte block.
struct Shadow {
    uint32_t wseq = 0;
    uint8_t wpipe = 0;
    uint32_t rseq[kPipes] = {};
};

class PipeState {
public:
    // Fresh state for core `slot` of its AI core, owning the memories `owned` (bytes each).
    void Reset(const uint32_t* capacity, const bool* owned, int slot);
    // Issues an instruction on `pipe`.
    Op Issue(int pipe, const char* name);
    // Records that `op` reads or writes bytes [lo, hi) of memory `m`; a race fails the core.
    void Access(const Op& op, Memory m, uint32_t lo, uint32_t hi, bool write);
    // The clock a flag set on `src` now carries: every issued `src` instruction and what they
    // waited for.
    Clock Release(int src) const;
    // `dst`'s next instructions start after what `c` says is complete.
    void Acquire(int dst, const Clock& c);
    // Every pipe's next instructions start after what `c` says is complete (a cross-core wait
    // holds everything after it).
    void AcquireAll(const Clock& c);
    // PipeBarrier<pipe>: later `pipe` instructions after every earlier one (PIPE_ALL: every pipe
    // after every earlier instruction).
    void Barrier(int pipe);
    // How many `pipe` instructions `dst`'s next instruction knows complete.
    uint32_t Known(int dst, int pipe) const { return front_[dst].done[slot_ * kPipes + pipe]; }
    int Slot() const { return slot_; }
    // The instruction currently executing (the emulated API sets it around each instruction).
    Op current;

private:
    std::string Describe(int pipe, uint32_t seq) const;
    int slot_ = 0;
    uint32_t count_[kPipes] = {};
    Clock front_[kPipes];
    std::vector<const char*> names_[kPipes];
    std::vector<Shadow> shadow_[(int)Memory::COUNT];
};

}  // namespace emu
}  // namespace AscendC

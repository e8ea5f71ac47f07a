// The happens-before checker of include/emu_pipes.h.

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <set>

#include "kernel_operator.h"

namespace AscendC {
namespace emu {

const char* PipeName(int pipe) {
    static const char* names[] = {"S", "V", "M", "MTE1", "MTE2", "MTE3", "FIX"};
    return pipe >= 0 && pipe < kPipes ? names[pipe] : "?";
}

void PipeState::Reset(const uint32_t* capacity, const bool* owned) {
    for (int p = 0; p < kPipes; p++) {
        count_[p] = 0;
        front_[p] = Clock();
        names_[p].clear();
    }
    for (int m = 0; m < (int)Memory::COUNT; m++) {
        shadow_[m].clear();
        if (owned[m]) shadow_[m].resize(capacity[m] / ONE_BLK_SIZE);
    }
    current = Op();
}

Op PipeState::Issue(int pipe, const char* name) {
    Op op;
    op.pipe = pipe;
    op.seq = ++count_[pipe];
    op.name = name;
    op.clk = front_[pipe];
    // In-order pipes: every earlier instruction of the pipe is complete. V only up to its last
    // PipeBarrier<PIPE_V> (kept in front_[V].done[V]).
    if (pipe != PIPE_V) op.clk.done[pipe] = op.seq - 1;
    names_[pipe].push_back(name);
    return op;
}

std::string PipeState::Describe(int pipe, uint32_t seq) const {
    const char* name = seq >= 1 && seq <= names_[pipe].size() ? names_[pipe][seq - 1] : "?";
    return std::string(name) + " (" + PipeName(pipe) + " #" + std::to_string(seq) + ")";
}

namespace {
// EK_EMU_RACES=log: print each distinct race once and go on (to find them all in one run).
bool LogOnly() {
    static const bool log = [] {
        const char* v = std::getenv("EK_EMU_RACES");
        return v && std::string(v) == "log";
    }();
    return log;
}
void Report(const std::string& what) {
    if (!LogOnly()) EmuFail(what);
    static std::mutex mu;
    static std::set<std::string> seen;
    std::lock_guard<std::mutex> lock(mu);
    // One line per kind of race: the text without sequence numbers and byte ranges.
    std::string key;
    for (size_t i = 0; i < what.size(); i++) {
        if (what[i] == '#' || what[i] == '[') {
            while (i < what.size() && what[i] != ')' && what[i] != ' ') i++;
        }
        if (i < what.size()) key += what[i];
    }
    if (seen.insert(key).second) std::fprintf(stderr, "ek-emu race: %s\n", what.c_str());
}
}  // namespace

void PipeState::Access(const Op& op, Memory m, uint32_t lo, uint32_t hi, bool write) {
    std::vector<Shadow>& sh = shadow_[(int)m];
    if (op.pipe < 0) EmuFail(std::string("internal: an access to ") + MemoryName(m) + " outside an instruction");
    if (sh.empty() || hi <= lo) return;
    const uint32_t b0 = lo / ONE_BLK_SIZE, b1 = (hi + ONE_BLK_SIZE - 1) / ONE_BLK_SIZE;
    for (uint32_t b = b0; b < b1 && b < sh.size(); b++) {
        Shadow& s = sh[b];
        const auto race = [&](const char* kind, int pipe, uint32_t seq) {
            Report(std::string("race: ") + Describe(op.pipe, op.seq) + " " + (write ? "writes" : "reads") + " " +
                   MemoryName(m) + " bytes [" + std::to_string(lo) + ", " + std::to_string(hi) + ") that " +
                   Describe(pipe, seq) + " " + kind + " with no synchronisation between them (" +
                   (pipe == op.pipe ? "PipeBarrier<PIPE_V>" : std::string("SetFlag/WaitFlag ") + PipeName(pipe) + "_" + PipeName(op.pipe)) +
                   " missing)");
        };
        if (!op.After(s.wpipe, s.wseq)) race("writes", s.wpipe, s.wseq);
        if (write) {
            // A scalar read is done when GetValue returns, before the scalar unit issues anything
            // after it: it never races with a later write.
            for (int p = 0; p < kPipes; p++)
                if (p != PIPE_S && !op.After(p, s.rseq[p])) race("still reads", p, s.rseq[p]);
            s.wseq = op.seq;
            s.wpipe = (uint8_t)op.pipe;
        } else {
            s.rseq[op.pipe] = op.seq;
        }
    }
}

Clock PipeState::Release(int src) const {
    Clock c = front_[src];
    c.done[src] = count_[src];
    return c;
}

void PipeState::Acquire(int dst, const Clock& c) { front_[dst].Join(c); }

void PipeState::Barrier(int pipe) {
    if (pipe == PIPE_ALL) {
        Clock all;
        for (int p = 0; p < kPipes; p++) all.Join(Release(p));
        for (int p = 0; p < kPipes; p++) front_[p].Join(all);
        return;
    }
    front_[pipe].Join(Release(pipe));
}

}  // namespace emu
}  // namespace AscendC

namespace AscendC {
namespace emu {

std::string EventName(HardEvent e) {
    const EventPipes p = PipesOf(e);
    return std::string(PipeName(p.src)) + "_" + PipeName(p.dst);
}

void OnRemainCountSync(int dst) {
    CoreState& c = Core();
    if (c.remain_seq && dst == PIPE_S && c.pipes.Known(PIPE_S, PIPE_V) >= c.remain_seq) c.remain_seq = 0;
}

void RemainCountUnsynced(const char* next) {
    EmuFail(std::string("GatherMask's rsvdCnt used before a V_S SetFlag/WaitFlag covering the GatherMask (") + next +
            " issued in between): the count is written by the vector pipe, behind the scalar unit");
}

}  // namespace emu
}  // namespace AscendC

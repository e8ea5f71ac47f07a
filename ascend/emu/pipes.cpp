// The happens-before checker of include/emu_pipes.h.

#include <algorithm>
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

void PipeState::Reset(const uint32_t* capacity, const bool* owned, int slot) {
    slot_ = slot;
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
    op.slot = slot_;
    op.seq = ++count_[pipe];
    op.name = name;
    op.clk = front_[pipe];
    // In-order pipes: every earlier instruction of the pipe is complete. V only up to its last
    // PipeBarrier<PIPE_V> (kept in front_[V].done[V]).
    if (pipe != PIPE_V) op.clk.done[slot_ * kPipes + pipe] = op.seq - 1;
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
    c.done[slot_ * kPipes + src] = count_[src];
    return c;
}

void PipeState::Acquire(int dst, const Clock& c) { front_[dst].Join(c); }

void PipeState::AcquireAll(const Clock& c) {
    for (int p = 0; p < kPipes; p++) front_[p].Join(c);
}

namespace {
const char* SlotName(int slot, bool mixed) {
    static const char* names[kSlots] = {"the AIC", "AIV 0", "AIV 1"};
    return mixed ? names[slot] : "this core";
}
std::string Hex(uint64_t x) {
    char b[24];
    std::snprintf(b, sizeof b, "%#llx", (unsigned long long)x);
    return b;
}
}  // namespace

void GmShadow::Access(const Op& op, uint32_t group, uint64_t lo, uint64_t hi, bool write, bool mixed) {
    if (op.pipe < 0) EmuFail("internal: a global memory access outside an instruction");
    if (hi <= lo) return;
    std::string race;
    {
        std::lock_guard<std::mutex> lock(mu_);
        // Segments covering [lo, hi) exactly: split those that straddle lo or hi, fill the gaps.
        auto split = [&](uint64_t at) {
            auto it = segs_.upper_bound(at);
            if (it == segs_.begin()) return;
            --it;
            if (it->first < at && it->second.end > at) {
                Segment tail = it->second;
                it->second.end = at;
                segs_.emplace(at, tail);
            }
        };
        split(lo);
        split(hi);
        for (uint64_t at = lo; at < hi;) {
            auto it = segs_.lower_bound(at);
            const uint64_t next = it == segs_.end() ? hi : std::min<uint64_t>(it->first, hi);
            if (next > at) {  // a gap: no access yet
                Segment fresh;
                fresh.end = next;
                segs_.emplace(at, fresh);
                at = next;
            } else {
                at = it->second.end;
            }
        }
        const auto ordered = [&](const GmRef& r) {
            return r.seq == 0 || (r.group == group && op.After(r.slot, r.pipe, r.seq));
        };
        const auto describe = [&](const GmRef& r, const char* kind) {
            std::string who = r.group != group ? std::string("core ") + std::to_string(r.group) + "'s"
                              : r.slot != op.slot ? std::string(SlotName(r.slot, mixed)) + "'s"
                                                  : std::string();
            return (who.empty() ? "" : who + " ") + r.name + " (" + PipeName(r.pipe) + " #" + std::to_string(r.seq) + ") " + kind;
        };
        const auto why = [&](const GmRef& r) -> std::string {
            if (r.group != group) return "different cores of one launch: nothing orders them before the launch ends";
            if (r.slot != op.slot)
                return std::string("a CrossCoreSetFlag on ") + SlotName(r.slot, mixed) + " issued on a pipe after " +
                       PipeName(r.pipe) + "'s access, and the CrossCoreWaitFlag before this one, missing";
            return std::string("SetFlag/WaitFlag ") + PipeName(r.pipe) + "_" + PipeName(op.pipe) + " missing";
        };
        for (auto it = segs_.lower_bound(lo); it != segs_.end() && it->first < hi; ++it) {
            Segment& g = it->second;
            if (race.empty() && !ordered(g.w)) race = describe(g.w, "writes") + " with no synchronisation between them (" + why(g.w) + ")";
            if (write) {
                for (const GmRef& r : g.r) {
                    // A scalar read is done when GetValue returns: never overtaken by its core's later writes.
                    const bool scalar_own = r.pipe == PIPE_S && r.group == group && r.slot == op.slot;
                    if (race.empty() && !scalar_own && !ordered(r))
                        race = describe(r, "still reads") + " with no synchronisation between them (" + why(r) + ")";
                }
                g.w = GmRef{op.seq, group, (uint8_t)op.slot, (uint8_t)op.pipe, op.name};
                for (GmRef& r : g.r) r = GmRef();
                g.next = 0;
            } else {
                GmRef me{op.seq, group, (uint8_t)op.slot, (uint8_t)op.pipe, op.name};
                int at = -1;
                for (int k = 0; k < kReaders; k++)
                    if (g.r[k].seq && g.r[k].group == group && g.r[k].slot == op.slot && g.r[k].pipe == op.pipe) at = k;
                for (int k = 0; k < kReaders && at < 0; k++)
                    if (!g.r[k].seq) at = k;
                if (at < 0) {  // full: forget the oldest entry (a missed race at worst, never a false one)
                    at = g.next;
                    g.next = (uint8_t)((g.next + 1) % kReaders);
                }
                g.r[at] = me;
            }
        }
    }
    if (!race.empty())
        Report("race: " + std::string(op.name) + " (" + PipeName(op.pipe) + " #" + std::to_string(op.seq) + ") " +
               (write ? "writes" : "reads") + " GM bytes [" + Hex(lo) + ", " + Hex(hi) + ") that " + race);
}

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

void TrackGm(const void* p, uint64_t bytes, bool write) {
    CoreState& c = Core();
    if (!c.gm) return;
    const uint64_t lo = reinterpret_cast<uint64_t>(p);
    c.gm->Access(c.pipes.current, c.gm_group, lo, lo + bytes, write, c.group != nullptr);
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

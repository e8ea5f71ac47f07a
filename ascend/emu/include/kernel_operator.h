// Host emulation of the subset of the Ascend C API that ascend/kernels uses, written from the
// public Ascend C documentation (hiascend.com API reference), not from CANN sources. Kernels are
// compiled unchanged against this header by the host C++ compiler and run core by core.
//
// It fails loudly (an EmuError naming the core and the rule) where the hardware would misbehave:
// a buffer that overflows its memory (UB 192 KiB, L1 512 KiB, L0A/L0B 64 KiB, L0C 128 KiB), an
// access outside a tensor, a local tensor or a DataCopy that breaks the 32-byte rule, queue misuse
// (AllocTensor with none free, DeQue on an empty queue, EnQue/FreeTensor of a tensor the queue did
// not hand out, a tensor never freed), and SetFlag/WaitFlag that do not pair. Unified buffer memory
// starts poisoned (all bits set: NaN for floats) so reading what was never written shows up.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "emu_pipes.h"

#define __aicore__
#define __global__
#define __gm__
#define GM_ADDR uint8_t*

namespace AscendC {

// ------------------------------------------------------------------------------------------------
// Errors

struct EmuError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

[[noreturn]] void EmuFail(const std::string& what);

// Work counters of the emulated launches (what the kernels would cost on the hardware): bytes
// moved between GM and the local memories, cube multiply-accumulates over whole fractals, vector
// repeats (256-byte steps: the unit a vector instruction takes a cycle for) and instructions,
// scalar GM accesses. Summed over every core until reset (ek_emu_counters).
enum class Count : int { GmRead, GmWrite, CubeMacs, VectorRepeats, VectorInstrs, ScalarGm, N };
void AddCount(Count c, uint64_t n);
inline void CountVector(uint64_t bytes) {
    AddCount(Count::VectorInstrs, 1);
    AddCount(Count::VectorRepeats, (bytes + 255) / 256);
}

// ------------------------------------------------------------------------------------------------
// 16-bit float types (storage plus round-to-nearest-even conversions).

struct half {
    uint16_t bits = 0;
    half() = default;
    half(float f);
    operator float() const;
};

struct bfloat16_t {
    uint16_t bits = 0;
    bfloat16_t() = default;
    bfloat16_t(float f) {
        uint32_t u;
        std::memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            bits = 0x7fc0;
        } else {
            u += 0x7fffu + ((u >> 16) & 1u);
            bits = (uint16_t)(u >> 16);
        }
    }
    operator float() const {
        uint32_t u = (uint32_t)bits << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
};

// ------------------------------------------------------------------------------------------------
// Logical positions and the physical memories behind them.

enum class TPosition : uint8_t { GM, A1, A2, B1, B2, C1, C2, CO1, CO2, VECIN, VECOUT, VECCALC, MAX };
using QuePosition = TPosition;

constexpr uint32_t ONE_BLK_SIZE = 32;    // bytes of one data block
constexpr uint32_t ONE_REPEAT_BYTES = 256;  // bytes one vector repeat covers (8 blocks)

Memory MemoryOf(TPosition p);
const char* MemoryName(Memory m);
uint32_t MemoryCapacity(Memory m);

struct CrossCoreGroup;

// The emulated state of one AI core while it runs.
struct CoreState {
    uint32_t block_idx = 0;
    uint32_t block_num = 1;
    bool cube = false;               // an AIC (L1/L0 only); otherwise an AIV (UB only)
    uint32_t sub_block = 0;          // AIV index within its group (mixed launches)
    CrossCoreGroup* group = nullptr;  // the AIC and its two AIVs of a mixed launch
    std::vector<uint8_t> mem[(int)Memory::COUNT];
    uint32_t used[(int)Memory::COUNT] = {};
    bool pipe_exists = false;
    uint32_t buffers = 0;                   // InitBuffer blocks handed out (≤ 64 per kernel)
    uint32_t que_buffers[(int)TPosition::MAX] = {};  // queue blocks per position (≤ 8)
    std::map<std::pair<int, int>, int> flags;  // (event, id) -> pending SetFlag count
    std::map<std::pair<int, int>, emu::Clock> flag_clocks;  // (event, id) -> what its SetFlag released
    emu::PipeState pipes;                      // the asynchronous pipes (emu_pipes.h)
    uint32_t remain_seq = 0;                   // a GatherMask whose count no V->S sync has covered yet
    uint64_t sync_base = 0;                    // SetSyncBaseAddr's address (0: not set)
    int task_type = -1;                        // KERNEL_TASK_TYPE_DEFAULT's type (-1: none)
    std::vector<std::string> leaks;            // filled by queues that end with live tensors
    emu::GmShadow* gm = nullptr;               // the launch's global-memory accesses (emu_pipes.h)
    uint32_t gm_group = 0;                     // this core's AI core (mixed) or vector core index
};

CoreState& Core();

namespace emu {
[[noreturn]] void RemainCountUnsynced(const char* next);
// Records that the instruction running now reads or writes GM bytes [p, p + bytes).
void TrackGm(const void* p, uint64_t bytes, bool write);
// Runs one emulated instruction on `pipe`: the tensors' In/Out accesses inside are its.
struct OpScope {
    OpScope(int pipe, const char* name) {
        CoreState& c = Core();
        if (c.remain_seq) RemainCountUnsynced(name);
        c.pipes.current = c.pipes.Issue(pipe, name);
    }
    ~OpScope() { Core().pipes.current = Op(); }
    OpScope(const OpScope&) = delete;
    OpScope& operator=(const OpScope&) = delete;
};
}  // namespace emu

// ------------------------------------------------------------------------------------------------
// Tensors

template <typename T> class GlobalTensor {
public:
    __aicore__ void SetGlobalBuffer(__gm__ T* buffer, uint64_t size = UINT64_MAX) {
        base_ = buffer;
        size_ = size;
    }
    __aicore__ GlobalTensor operator[](uint64_t offset) const {
        GlobalTensor g;
        g.base_ = base_ + offset;
        g.size_ = size_ == UINT64_MAX ? UINT64_MAX : (offset <= size_ ? size_ - offset : 0);
        return g;
    }
    // The scalar unit's reads and writes of GM (pipe S).
    __aicore__ T GetValue(uint64_t i) const {
        emu::OpScope op(PIPE_S, "GetValue(GM)");
        AddCount(Count::ScalarGm, 1);
        return *Read(i, 1);
    }
    __aicore__ void SetValue(uint64_t i, T v) {
        emu::OpScope op(PIPE_S, "SetValue(GM)");
        AddCount(Count::ScalarGm, 1);
        *Write(i, 1) = v;
    }
    __aicore__ __gm__ T* GetPhyAddr() const { return base_; }
    __aicore__ uint64_t GetSize() const { return size_; }
    // Emulator: At, recorded as a read or a write of the instruction running now.
    const T* Read(uint64_t i, uint64_t count) const {
        T* p = At(i, count);
        emu::TrackGm(p, count * sizeof(T), false);
        return p;
    }
    T* Write(uint64_t i, uint64_t count) const {
        T* p = At(i, count);
        emu::TrackGm(p, count * sizeof(T), true);
        return p;
    }
    // Emulator: `count` elements from `i`, bounds-checked against the declared size.
    T* At(uint64_t i, uint64_t count) const {
        if (!base_) EmuFail("GlobalTensor used before SetGlobalBuffer");
        if (size_ != UINT64_MAX && i + count > size_)
            EmuFail("GlobalTensor access [" + std::to_string(i) + ", " + std::to_string(i + count) +
                    ") outside its " + std::to_string(size_) + " elements");
        return base_ + i;
    }

private:
    T* base_ = nullptr;
    uint64_t size_ = UINT64_MAX;
};

template <typename T> class LocalTensor {
public:
    LocalTensor() = default;
    LocalTensor(TPosition pos, uint32_t offset, uint32_t bytes, int owner, uint32_t base, uint32_t limit)
        : pos_(pos), offset_(offset), bytes_(bytes), owner_(owner), base_(base), limit_(limit) {}

    // The scalar unit's reads and writes (pipe S).
    __aicore__ T GetValue(uint32_t i) const {
        emu::OpScope op(PIPE_S, "GetValue");
        return *In(i, 1);
    }
    __aicore__ void SetValue(uint32_t i, T v) const {
        emu::OpScope op(PIPE_S, "SetValue");
        *Out(i, 1) = v;
    }
    __aicore__ uint32_t GetSize() const { return bytes_ / sizeof(T); }
    __aicore__ TPosition GetPosition() const { return pos_; }
    // A view starting `offset` elements in (to the end of this tensor).
    __aicore__ LocalTensor operator[](uint32_t offset) const {
        if ((uint64_t)offset * sizeof(T) > bytes_) EmuFail("LocalTensor offset " + std::to_string(offset) + " past its end");
        LocalTensor t = *this;
        t.offset_ += offset * sizeof(T);
        t.bytes_ -= offset * sizeof(T);
        return t;
    }
    template <typename U> __aicore__ LocalTensor<U> ReinterpretCast() const {
        return LocalTensor<U>(pos_, offset_, bytes_, owner_, base_, limit_);
    }
    // Emulator: pointer to `count` elements from `i`, checked against the tensor and its buffer.
    T* Ptr(uint32_t i, uint32_t count) const {
        if (owner_ == kInvalid) EmuFail("LocalTensor used before it was allocated");
        const uint64_t lo = offset_ + (uint64_t)i * sizeof(T), hi = lo + (uint64_t)count * sizeof(T);
        if (hi > offset_ + bytes_ || hi > limit_)
            EmuFail("access of elements [" + std::to_string(i) + ", " + std::to_string(i + count) +
                    ") beyond a LocalTensor of " + std::to_string(bytes_ / sizeof(T)) + " in " + MemoryName(MemoryOf(pos_)));
        return reinterpret_cast<T*>(Core().mem[(int)MemoryOf(pos_)].data() + lo);
    }
    // Emulator: Ptr, recorded as a read (In) or a write (Out) of the instruction running now.
    T* In(uint32_t i, uint32_t count) const {
        T* p = Ptr(i, count);
        Track(i, count, false);
        return p;
    }
    T* Out(uint32_t i, uint32_t count) const {
        T* p = Ptr(i, count);
        Track(i, count, true);
        return p;
    }
    void Track(uint32_t i, uint32_t count, bool write) const {
        const uint32_t lo = offset_ + i * (uint32_t)sizeof(T);
        CoreState& c = Core();
        c.pipes.Access(c.pipes.current, MemoryOf(pos_), lo, lo + count * (uint32_t)sizeof(T), write);
    }
    // Emulator: the tensor's start must sit on a 32-byte boundary for vector and copy instructions.
    void CheckAligned(const char* what) const {
        if (offset_ % ONE_BLK_SIZE)
            EmuFail(std::string(what) + ": local tensor address " + std::to_string(offset_) + " is not 32-byte aligned");
    }
    uint32_t Offset() const { return offset_; }
    int Owner() const { return owner_; }
    static constexpr int kInvalid = -2;

private:
    TPosition pos_ = TPosition::VECCALC;
    uint32_t offset_ = 0, bytes_ = 0;
    int owner_ = kInvalid;
    uint32_t base_ = 0, limit_ = 0;  // the owning buffer's byte range
};

// ------------------------------------------------------------------------------------------------
// Pipe, queues and buffers

uint32_t Allocate(TPosition pos, uint32_t bytes, uint32_t count, bool queue);

namespace emu {
// The pipe that fills a queue's tensors (EnQue) and the one that uses them (DeQue): the TQue
// page documents the queue as the synchronisation between them — EnQue/DeQue order the consumer
// after the producer, FreeTensor/AllocTensor the next fill after the consumer.
constexpr int QueueProducer(TPosition p) { return p == TPosition::VECIN ? PIPE_MTE2 : PIPE_V; }
constexpr int QueueConsumer(TPosition p) { return p == TPosition::VECOUT ? PIPE_MTE3 : PIPE_V; }
}  // namespace emu

template <TPosition P, int32_t DEPTH> class TQue {
public:
    static constexpr TPosition position = P;
    ~TQue() { CheckDrained(); }
    void InitBlocks(uint8_t num, uint32_t len) {
        len_ = (len + ONE_BLK_SIZE - 1) / ONE_BLK_SIZE * ONE_BLK_SIZE;
        const uint32_t base = Allocate(P, len_, num, true);
        for (uint32_t i = 0; i < num; i++) blocks_.push_back({base + i * len_, State::Free});
    }
    template <typename T> __aicore__ LocalTensor<T> AllocTensor() {
        for (size_t i = 0; i < blocks_.size(); i++) {
            if (blocks_[i].state == State::Free) {
                blocks_[i].state = State::Held;
                Core().pipes.Acquire(producer_, blocks_[i].freed);
                return LocalTensor<T>(P, blocks_[i].offset, len_, (int)i, blocks_[i].offset, blocks_[i].offset + len_);
            }
        }
        EmuFail("AllocTensor: all " + std::to_string(blocks_.size()) + " buffers of the queue are in use (a FreeTensor is missing)");
    }
    template <typename T> __aicore__ bool EnQue(const LocalTensor<T>& t) {
        Block& b = Own(t, "EnQue");
        if (b.state != State::Held) EmuFail("EnQue of a tensor that is already queued");
        b.state = State::Queued;
        b.filled = Core().pipes.Release(producer_);
        fifo_.push_back(t.Owner());
        return true;
    }
    template <typename T> __aicore__ LocalTensor<T> DeQue() {
        if (fifo_.empty()) EmuFail("DeQue on an empty queue (the hardware would wait forever)");
        const int i = fifo_.front();
        fifo_.pop_front();
        blocks_[i].state = State::Held;
        Core().pipes.Acquire(consumer_, blocks_[i].filled);
        return LocalTensor<T>(P, blocks_[i].offset, len_, i, blocks_[i].offset, blocks_[i].offset + len_);
    }
    template <typename T> __aicore__ void FreeTensor(LocalTensor<T>& t) {
        Block& b = Own(t, "FreeTensor");
        if (b.state == State::Queued) EmuFail("FreeTensor of a tensor still in the queue");
        b.state = State::Free;
        b.freed = Core().pipes.Release(consumer_);
    }

protected:
    int producer_ = emu::QueueProducer(P), consumer_ = emu::QueueConsumer(P);

private:
    enum class State { Free, Held, Queued };
    struct Block {
        uint32_t offset;
        State state;
        emu::Clock filled = {}, freed = {};  // released by EnQue and by FreeTensor
    };
    template <typename T> Block& Own(const LocalTensor<T>& t, const char* what) {
        const int i = t.Owner();
        if (i < 0 || i >= (int)blocks_.size() || blocks_[i].offset > t.Offset() || t.Offset() >= blocks_[i].offset + len_)
            EmuFail(std::string(what) + " of a tensor this queue did not hand out");
        if (blocks_[i].state == State::Free) EmuFail(std::string(what) + " of a tensor already freed");
        return blocks_[i];
    }
    void CheckDrained() {
        for (auto& b : blocks_)
            if (b.state != State::Free) Core().leaks.push_back("a queue tensor was never freed (AllocTensor/DeQue without FreeTensor)");
    }
    std::vector<Block> blocks_;
    std::deque<int> fifo_;
    uint32_t len_ = 0;
};

template <TPosition SRC, TPosition DST, int32_t DEPTH> class TQueBind : public TQue<SRC, DEPTH> {
public:
    TQueBind() {
        this->producer_ = emu::QueueProducer(SRC);
        this->consumer_ = emu::QueueConsumer(DST);
    }
};

template <TPosition P> class TBuf {
public:
    static constexpr TPosition position = P;
    void InitBlock(uint32_t len) {
        len_ = (len + ONE_BLK_SIZE - 1) / ONE_BLK_SIZE * ONE_BLK_SIZE;
        offset_ = Allocate(P, len_, 1, false);
        ready_ = true;
    }
    template <typename T> __aicore__ LocalTensor<T> Get() const { return Get<T>(len_ / sizeof(T)); }
    template <typename T> __aicore__ LocalTensor<T> Get(uint32_t count) const {
        if (!ready_) EmuFail("TBuf::Get before InitBuffer");
        if ((uint64_t)count * sizeof(T) > len_) EmuFail("TBuf::Get of " + std::to_string(count) + " elements beyond the buffer");
        return LocalTensor<T>(P, offset_, count * sizeof(T), -1, offset_, offset_ + len_);
    }

private:
    uint32_t offset_ = 0, len_ = 0;
    bool ready_ = false;
};

class TPipe {
public:
    TPipe();
    ~TPipe();
    template <class Q> __aicore__ bool InitBuffer(Q& que, uint8_t num, uint32_t len) {
        que.InitBlocks(num, len);
        return true;
    }
    template <TPosition P> __aicore__ bool InitBuffer(TBuf<P>& buf, uint32_t len) {
        buf.InitBlock(len);
        return true;
    }
};

// ------------------------------------------------------------------------------------------------
// Data movement

struct DataCopyParams {
    uint16_t blockCount = 1;
    uint16_t blockLen = 0;   // in 32-byte blocks
    uint16_t srcStride = 0;  // gap between blocks, in 32-byte blocks
    uint16_t dstStride = 0;
    DataCopyParams() = default;
    DataCopyParams(uint16_t count, uint16_t len, uint16_t src, uint16_t dst)
        : blockCount(count), blockLen(len), srcStride(src), dstStride(dst) {}
};

struct DataCopyExtParams {
    uint16_t blockCount = 1;
    uint32_t blockLen = 0;   // bytes
    uint32_t srcStride = 0;  // GM side: bytes; local side: 32-byte blocks
    uint32_t dstStride = 0;
    uint32_t rsv = 0;
    DataCopyExtParams() = default;
    DataCopyExtParams(uint16_t count, uint32_t len, uint32_t src, uint32_t dst, uint32_t r)
        : blockCount(count), blockLen(len), srcStride(src), dstStride(dst), rsv(r) {}
};

template <typename T> struct DataCopyPadExtParams {
    bool isPad = false;
    uint8_t leftPadding = 0;
    uint8_t rightPadding = 0;
    T paddingValue = T();
    DataCopyPadExtParams() = default;
    DataCopyPadExtParams(bool pad, uint8_t left, uint8_t right, T value)
        : isPad(pad), leftPadding(left), rightPadding(right), paddingValue(value) {}
};

template <typename T> __aicore__ void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, uint32_t count) {
    emu::OpScope op(PIPE_MTE2, "DataCopy(GM->local)");
    dst.CheckAligned("DataCopy");
    if ((count * sizeof(T)) % ONE_BLK_SIZE)
        EmuFail("DataCopy of " + std::to_string(count * sizeof(T)) + " bytes: DataCopy moves whole 32-byte blocks (use DataCopyPad)");
    std::memcpy(dst.Out(0, count), src.Read(0, count), count * sizeof(T));
    AddCount(Count::GmRead, count * sizeof(T));
}
template <typename T> __aicore__ void DataCopy(const GlobalTensor<T>& dst, const LocalTensor<T>& src, uint32_t count) {
    emu::OpScope op(PIPE_MTE3, "DataCopy(UB->GM)");
    src.CheckAligned("DataCopy");
    if ((count * sizeof(T)) % ONE_BLK_SIZE)
        EmuFail("DataCopy of " + std::to_string(count * sizeof(T)) + " bytes: DataCopy moves whole 32-byte blocks (use DataCopyPad)");
    std::memcpy(dst.Write(0, count), src.In(0, count), count * sizeof(T));
    AddCount(Count::GmWrite, count * sizeof(T));
}
template <typename T> __aicore__ void DataCopy(const LocalTensor<T>& dst, const LocalTensor<T>& src, uint32_t count) {
    emu::OpScope op(PIPE_V, "DataCopy(UB->UB)");  // a vector-pipe copy inside the unified buffer
    dst.CheckAligned("DataCopy");
    src.CheckAligned("DataCopy");
    if ((count * sizeof(T)) % ONE_BLK_SIZE)
        EmuFail("DataCopy of " + std::to_string(count * sizeof(T)) + " bytes: DataCopy moves whole 32-byte blocks");
    const T* from = src.In(0, count);
    std::memmove(dst.Out(0, count), from, count * sizeof(T));
}

// GM -> local, block by block; each block lands on a 32-byte boundary. What fills the rest of a
// block's last 32 bytes (DataCopyPad page, padParams): `rightPadding` elements of
// `paddingValue` when isPad is set; past them — all of the tail when the padding counts are 0 —
// the hardware repeats the burst's first element (the documented dummy fill; the pad value is NOT
// used there). Without isPad the tail is undefined: poisoned here.
template <typename T>
__aicore__ void DataCopyPad(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const DataCopyExtParams& p,
                            const DataCopyPadExtParams<T>& pad) {
    emu::OpScope op(PIPE_MTE2, "DataCopyPad(GM->UB)");
    dst.CheckAligned("DataCopyPad");
    if (p.blockLen % sizeof(T)) EmuFail("DataCopyPad: blockLen is not a whole number of elements");
    if (pad.leftPadding != 0) EmuFail("DataCopyPad: leftPadding is not emulated");
    const uint32_t n = p.blockLen / sizeof(T);
    const uint32_t padded = (p.blockLen + ONE_BLK_SIZE - 1) / ONE_BLK_SIZE * ONE_BLK_SIZE / sizeof(T);
    if (pad.isPad && n + pad.rightPadding > padded)
        EmuFail("DataCopyPad: rightPadding " + std::to_string(pad.rightPadding) + " reaches past the block's 32-byte grid");
    const uint32_t dst_step = padded + p.dstStride * ONE_BLK_SIZE / sizeof(T);
    if (p.srcStride % sizeof(T)) EmuFail("DataCopyPad: srcStride is not a whole number of elements");
    const uint64_t src_step = n + p.srcStride / sizeof(T);
    for (uint32_t b = 0; b < p.blockCount; b++) {
        T* d = dst.Out(b * dst_step, padded);
        std::memcpy(d, src.Read(b * src_step, n), p.blockLen);
        AddCount(Count::GmRead, p.blockLen);
        for (uint32_t i = n; i < padded; i++) {
            if (!pad.isPad) {
                std::memset(static_cast<void*>(&d[i]), 0xff, sizeof(T));  // undefined on hardware: poison
            } else if (i < n + pad.rightPadding) {
                d[i] = pad.paddingValue;
            } else {
                d[i] = d[0];  // dummy fill: the burst's first element
            }
        }
    }
}

// Local -> GM, block by block: only blockLen bytes of each block are written.
template <typename T> __aicore__ void DataCopyPad(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const DataCopyExtParams& p) {
    emu::OpScope op(PIPE_MTE3, "DataCopyPad(UB->GM)");
    src.CheckAligned("DataCopyPad");
    if (p.blockLen % sizeof(T)) EmuFail("DataCopyPad: blockLen is not a whole number of elements");
    const uint32_t n = p.blockLen / sizeof(T);
    const uint32_t padded = (p.blockLen + ONE_BLK_SIZE - 1) / ONE_BLK_SIZE * ONE_BLK_SIZE / sizeof(T);
    const uint32_t src_step = padded + p.srcStride * ONE_BLK_SIZE / sizeof(T);
    if (p.dstStride % sizeof(T)) EmuFail("DataCopyPad: dstStride is not a whole number of elements");
    const uint64_t dst_step = n + p.dstStride / sizeof(T);
    for (uint32_t b = 0; b < p.blockCount; b++) std::memcpy(dst.Write(b * dst_step, n), src.In(b * src_step, n), p.blockLen);
    AddCount(Count::GmWrite, (uint64_t)p.blockCount * p.blockLen);
}

// ------------------------------------------------------------------------------------------------
// Vector instructions. Level-2 forms take an element count; level-0 forms take a mask (count
// mode, or a 128-bit bit mask), a repeat count and block/repeat strides in 32-byte units.

struct BinaryRepeatParams {
    uint8_t dstBlkStride = 1, src0BlkStride = 1, src1BlkStride = 1;
    uint8_t dstRepStride = 8, src0RepStride = 8, src1RepStride = 8;
    BinaryRepeatParams() = default;
    BinaryRepeatParams(uint8_t db, uint8_t s0b, uint8_t s1b, uint8_t dr, uint8_t s0r, uint8_t s1r)
        : dstBlkStride(db), src0BlkStride(s0b), src1BlkStride(s1b), dstRepStride(dr), src0RepStride(s0r), src1RepStride(s1r) {}
};
struct UnaryRepeatParams {
    uint16_t dstBlkStride = 1, srcBlkStride = 1;
    uint8_t dstRepStride = 8, srcRepStride = 8;
    UnaryRepeatParams() = default;
    UnaryRepeatParams(uint16_t db, uint16_t sb, uint8_t dr, uint8_t sr)
        : dstBlkStride(db), srcBlkStride(sb), dstRepStride(dr), srcRepStride(sr) {}
};

namespace emu {
template <typename T> void CheckVectorOperand(const LocalTensor<T>& t, const char* op) {
    const Memory m = MemoryOf(t.GetPosition());
    if (m != Memory::UB) EmuFail(std::string(op) + ": vector operands must live in the unified buffer");
    t.CheckAligned(op);
    static_assert(std::is_same<T, float>::value || std::is_same<T, half>::value || std::is_same<T, int32_t>::value ||
                      std::is_same<T, uint32_t>::value || std::is_same<T, int16_t>::value || std::is_same<T, uint16_t>::value,
                  "vector instructions take half, float or integer operands (cast bfloat16_t first)");
}

// Which of the elements of one repeat (256 bytes) the mask selects.
template <typename T> bool MaskBit(uint64_t count_mask, const uint64_t* bits, uint32_t e) {
    if (bits) return e < 64 ? ((bits[0] >> e) & 1) : ((bits[1] >> (e - 64)) & 1);
    return e < count_mask;
}

template <typename T> void CheckMask(uint64_t count_mask, const uint64_t* bits, const char* op) {
    const uint32_t per_repeat = ONE_REPEAT_BYTES / sizeof(T);
    if (!bits && (count_mask == 0 || count_mask > per_repeat))
        EmuFail(std::string(op) + ": mask " + std::to_string(count_mask) + " outside 1.." + std::to_string(per_repeat));
    if (bits && per_repeat <= 64 && bits[1] != 0) EmuFail(std::string(op) + ": mask bits beyond the elements of a repeat");
}

// Applies f to every selected element: out[dst] = f(in0[src0], in1[src1]).
template <typename T, typename F>
void RepeatBinary(const LocalTensor<T>& dst, const LocalTensor<T>& s0, const LocalTensor<T>& s1, uint64_t mask, const uint64_t* bits,
                  uint8_t repeats, const BinaryRepeatParams& p, const char* op, F f) {
    OpScope vector(PIPE_V, op);
    CheckVectorOperand(dst, op);
    CheckVectorOperand(s0, op);
    CheckVectorOperand(s1, op);
    CheckMask<T>(mask, bits, op);
    CountVector((uint64_t)repeats * ONE_REPEAT_BYTES);
    const uint32_t epb = ONE_BLK_SIZE / sizeof(T);
    for (uint32_t r = 0; r < repeats; r++)
        for (uint32_t b = 0; b < 8; b++)
            for (uint32_t e = 0; e < epb; e++) {
                if (!MaskBit<T>(mask, bits, b * epb + e)) continue;
                const uint32_t di = (r * p.dstRepStride + b * p.dstBlkStride) * epb + e;
                const uint32_t ai = (r * p.src0RepStride + b * p.src0BlkStride) * epb + e;
                const uint32_t bi = (r * p.src1RepStride + b * p.src1BlkStride) * epb + e;
                const T x = *s0.In(ai, 1), y = *s1.In(bi, 1);
                *dst.Out(di, 1) = f(x, y);
            }
}

template <typename T, typename F>
void RepeatUnary(const LocalTensor<T>& dst, const LocalTensor<T>& src, uint64_t mask, const uint64_t* bits, uint8_t repeats,
                 const UnaryRepeatParams& p, const char* op, F f) {
    OpScope vector(PIPE_V, op);
    CheckVectorOperand(dst, op);
    CheckVectorOperand(src, op);
    CheckMask<T>(mask, bits, op);
    CountVector((uint64_t)repeats * ONE_REPEAT_BYTES);
    const uint32_t epb = ONE_BLK_SIZE / sizeof(T);
    for (uint32_t r = 0; r < repeats; r++)
        for (uint32_t b = 0; b < 8; b++)
            for (uint32_t e = 0; e < epb; e++) {
                if (!MaskBit<T>(mask, bits, b * epb + e)) continue;
                const uint32_t di = (r * p.dstRepStride + b * p.dstBlkStride) * epb + e;
                const uint32_t si = (r * p.srcRepStride + b * p.srcBlkStride) * epb + e;
                const T x = *src.In(si, 1);
                *dst.Out(di, 1) = f(x);
            }
}

// Level 2: `count` contiguous elements.
template <typename T, typename F>
void CountBinary(const LocalTensor<T>& dst, const LocalTensor<T>& s0, const LocalTensor<T>& s1, int32_t count, const char* op, F f) {
    OpScope vector(PIPE_V, op);
    CheckVectorOperand(dst, op);
    CheckVectorOperand(s0, op);
    CheckVectorOperand(s1, op);
    if (count < 0) EmuFail(std::string(op) + ": negative count");
    CountVector((uint64_t)count * sizeof(T));
    T* d = dst.Out(0, count);
    const T* a = s0.In(0, count);
    const T* b = s1.In(0, count);
    for (int32_t i = 0; i < count; i++) d[i] = f(a[i], b[i]);
}
template <typename T, typename F> void CountUnary(const LocalTensor<T>& dst, const LocalTensor<T>& src, int32_t count, const char* op, F f) {
    OpScope vector(PIPE_V, op);
    CheckVectorOperand(dst, op);
    CheckVectorOperand(src, op);
    if (count < 0) EmuFail(std::string(op) + ": negative count");
    CountVector((uint64_t)count * sizeof(T));
    T* d = dst.Out(0, count);
    const T* s = src.In(0, count);
    for (int32_t i = 0; i < count; i++) d[i] = f(s[i]);
}
template <typename T> T FromF(float x) { return (T)x; }
}  // namespace emu

#define EK_EMU_BINARY(NAME, EXPR)                                                                                              \
    template <typename T> __aicore__ void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& s0, const LocalTensor<T>& s1, \
                                               const int32_t& count) {                                                        \
        emu::CountBinary(dst, s0, s1, count, #NAME, [](T a, T b) { float x = (float)a, y = (float)b; return emu::FromF<T>(EXPR); }); \
    }                                                                                                                          \
    template <typename T> __aicore__ void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& s0, const LocalTensor<T>& s1, \
                                               uint64_t mask, const uint8_t repeatTimes, const BinaryRepeatParams& p) {       \
        emu::RepeatBinary(dst, s0, s1, mask, nullptr, repeatTimes, p, #NAME,                                                    \
                          [](T a, T b) { float x = (float)a, y = (float)b; return emu::FromF<T>(EXPR); });                      \
    }                                                                                                                          \
    template <typename T> __aicore__ void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& s0, const LocalTensor<T>& s1, \
                                               const uint64_t mask[2], const uint8_t repeatTimes, const BinaryRepeatParams& p) { \
        emu::RepeatBinary(dst, s0, s1, 0, mask, repeatTimes, p, #NAME,                                                          \
                          [](T a, T b) { float x = (float)a, y = (float)b; return emu::FromF<T>(EXPR); });                      \
    }

EK_EMU_BINARY(Add, x + y)
EK_EMU_BINARY(Sub, x - y)
EK_EMU_BINARY(Mul, x * y)
EK_EMU_BINARY(Div, x / y)
EK_EMU_BINARY(Max, (x > y || y != y) ? x : y)
EK_EMU_BINARY(Min, (x < y || y != y) ? x : y)

#define EK_EMU_UNARY(NAME, EXPR)                                                                                              \
    template <typename T> __aicore__ void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, const int32_t& count) { \
        emu::CountUnary(dst, src, count, #NAME, [](T a) { float x = (float)a; return emu::FromF<T>(EXPR); });                 \
    }                                                                                                                         \
    template <typename T> __aicore__ void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, uint64_t mask,           \
                                               const uint8_t repeatTimes, const UnaryRepeatParams& p) {                       \
        emu::RepeatUnary(dst, src, mask, nullptr, repeatTimes, p, #NAME, [](T a) { float x = (float)a; return emu::FromF<T>(EXPR); }); \
    }

EK_EMU_UNARY(Exp, std::exp(x))
EK_EMU_UNARY(Ln, std::log(x))
EK_EMU_UNARY(Abs, std::fabs(x))
EK_EMU_UNARY(Sqrt, std::sqrt(x))
EK_EMU_UNARY(Reciprocal, 1.0f / x)

#define EK_EMU_SCALAR(NAME, EXPR)                                                                                                      \
    template <typename T> __aicore__ void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, const T& scalar, const int32_t& count) { \
        const float s = (float)scalar;                                                                                                 \
        emu::CountUnary(dst, src, count, #NAME, [s](T a) { float x = (float)a; return emu::FromF<T>(EXPR); });                        \
    }                                                                                                                                  \
    template <typename T> __aicore__ void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, const T& scalar, uint64_t mask,   \
                                               const uint8_t repeatTimes, const UnaryRepeatParams& p) {                                \
        const float s = (float)scalar;                                                                                                 \
        emu::RepeatUnary(dst, src, mask, nullptr, repeatTimes, p, #NAME, [s](T a) { float x = (float)a; return emu::FromF<T>(EXPR); }); \
    }

EK_EMU_SCALAR(Adds, x + s)
EK_EMU_SCALAR(Muls, x * s)
EK_EMU_SCALAR(Maxs, (x > s || s != s) ? x : s)
EK_EMU_SCALAR(Mins, (x < s || s != s) ? x : s)

// dst = src · scalar + dst
template <typename T> __aicore__ void Axpy(const LocalTensor<T>& dst, const LocalTensor<T>& src, const T& scalar, const int32_t& count) {
    emu::OpScope op(PIPE_V, "Axpy");
    emu::CheckVectorOperand(dst, "Axpy");
    emu::CheckVectorOperand(src, "Axpy");
    const float s = (float)scalar;
    CountVector((uint64_t)count * sizeof(T));
    T* d = dst.Out(0, count);
    const T* x = src.In(0, count);
    for (int32_t i = 0; i < count; i++) d[i] = emu::FromF<T>((float)x[i] * s + (float)d[i]);
}

template <typename T> __aicore__ void Duplicate(const LocalTensor<T>& dst, const T& scalar, const int32_t& count) {
    emu::OpScope op(PIPE_V, "Duplicate");
    emu::CheckVectorOperand(dst, "Duplicate");
    CountVector((uint64_t)count * sizeof(T));
    T* d = dst.Out(0, count);
    for (int32_t i = 0; i < count; i++) d[i] = scalar;
}

// Level 0: `scalar` into the elements the mask selects, repeat by repeat.
namespace emu {
template <typename T>
void RepeatFill(const LocalTensor<T>& dst, T scalar, uint64_t mask, const uint64_t* bits, uint8_t repeats, uint16_t blk, uint8_t rep) {
    OpScope vector(PIPE_V, "Duplicate");
    CheckVectorOperand(dst, "Duplicate");
    CheckMask<T>(mask, bits, "Duplicate");
    CountVector((uint64_t)repeats * ONE_REPEAT_BYTES);
    const uint32_t epb = ONE_BLK_SIZE / sizeof(T);
    for (uint32_t r = 0; r < repeats; r++)
        for (uint32_t b = 0; b < 8; b++)
            for (uint32_t e = 0; e < epb; e++)
                if (MaskBit<T>(mask, bits, b * epb + e)) *dst.Out((r * rep + b * blk) * epb + e, 1) = scalar;
}
}  // namespace emu
template <typename T>
__aicore__ void Duplicate(const LocalTensor<T>& dst, const T& scalar, uint64_t mask, const uint8_t repeatTimes,
                          const uint16_t dstBlockStride, const uint8_t dstRepeatStride) {
    emu::RepeatFill(dst, scalar, mask, nullptr, repeatTimes, dstBlockStride, dstRepeatStride);
}
template <typename T>
__aicore__ void Duplicate(const LocalTensor<T>& dst, const T& scalar, const uint64_t mask[2], const uint8_t repeatTimes,
                          const uint16_t dstBlockStride, const uint8_t dstRepeatStride) {
    emu::RepeatFill(dst, scalar, 0, mask, repeatTimes, dstBlockStride, dstRepeatStride);
}

// BlockReduceMax / BlockReduceSum: each repeat reduces each of its 8 data blocks (the elements
// the mask selects) to one element; the 8 results are contiguous in dst, and dstRepStride
// counts in units of those 8 results (32 bytes for float, 16 for half).
namespace emu {
template <typename T, typename F>
void BlockReduce(const LocalTensor<T>& dst, const LocalTensor<T>& src, int32_t repeat, uint64_t mask, const uint64_t* bits,
                 int32_t dstRepStride, int32_t srcBlkStride, int32_t srcRepStride, const char* op, F f) {
    OpScope vector(PIPE_V, op);
    CheckVectorOperand(src, op);
    if (MemoryOf(dst.GetPosition()) != Memory::UB) EmuFail(std::string(op) + ": dst must live in the unified buffer");
    if (dst.Offset() % (8 * sizeof(T))) EmuFail(std::string(op) + ": dst is not aligned to 8 elements");
    if (repeat < 0 || repeat > 255) EmuFail(std::string(op) + ": repeat " + std::to_string(repeat) + " outside 0..255");
    CheckMask<T>(mask, bits, op);
    CountVector((uint64_t)repeat * ONE_REPEAT_BYTES);
    const uint32_t epb = ONE_BLK_SIZE / sizeof(T);
    for (int32_t r = 0; r < repeat; r++)
        for (uint32_t b = 0; b < 8; b++) {
            bool any = false;
            float acc = 0.0f;
            for (uint32_t e = 0; e < epb; e++) {
                if (!MaskBit<T>(mask, bits, b * epb + e)) continue;
                const float x = (float)*src.In(((uint32_t)r * srcRepStride + b * srcBlkStride) * epb + e, 1);
                acc = any ? f(acc, x) : x;
                any = true;
            }
            if (any) *dst.Out((uint32_t)r * dstRepStride * 8 + b, 1) = FromF<T>(acc);
        }
}
}  // namespace emu

#define EK_EMU_BLOCK_REDUCE(NAME, EXPR)                                                                                        \
    template <typename T>                                                                                                      \
    __aicore__ void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, const int32_t repeat, const int32_t maskCount,  \
                         const int32_t dstRepStride, const int32_t srcBlkStride, const int32_t srcRepStride) {                \
        emu::BlockReduce(dst, src, repeat, (uint64_t)maskCount, nullptr, dstRepStride, srcBlkStride, srcRepStride, #NAME,      \
                         [](float a, float x) { return EXPR; });                                                               \
    }                                                                                                                          \
    template <typename T>                                                                                                      \
    __aicore__ void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, const int32_t repeat, const uint64_t mask[2],   \
                         const int32_t dstRepStride, const int32_t srcBlkStride, const int32_t srcRepStride) {                \
        emu::BlockReduce(dst, src, repeat, 0, mask, dstRepStride, srcBlkStride, srcRepStride, #NAME,                           \
                         [](float a, float x) { return EXPR; });                                                               \
    }

EK_EMU_BLOCK_REDUCE(BlockReduceMax, (x > a || x != x) ? x : a)
EK_EMU_BLOCK_REDUCE(BlockReduceSum, a + x)

// Brcb: each repeat takes 8 consecutive elements of src and fills one 32-byte block of dst with
// each; dstBlkStride (0 counts as 1) and dstRepStride in blocks. src and dst may not coincide.
struct BrcbRepeatParams {
    uint16_t dstBlkStride = 1, dstRepStride = 8;
    BrcbRepeatParams() = default;
    BrcbRepeatParams(uint16_t db, uint16_t dr) : dstBlkStride(db), dstRepStride(dr) {}
};
template <typename T>
__aicore__ void Brcb(const LocalTensor<T>& dst, const LocalTensor<T>& src, const uint8_t repeatTimes, const BrcbRepeatParams& p) {
    emu::OpScope op(PIPE_V, "Brcb");
    emu::CheckVectorOperand(dst, "Brcb");
    emu::CheckVectorOperand(src, "Brcb");
    if (dst.Offset() == src.Offset()) EmuFail("Brcb: src and dst are the same address");
    CountVector((uint64_t)repeatTimes * ONE_REPEAT_BYTES);
    const uint32_t epb = ONE_BLK_SIZE / sizeof(T), blk = p.dstBlkStride ? p.dstBlkStride : 1;
    for (uint32_t r = 0; r < repeatTimes; r++)
        for (uint32_t b = 0; b < 8; b++) {
            const T x = *src.In(r * 8 + b, 1);
            T* d = dst.Out((r * p.dstRepStride + b * blk) * epb, epb);
            for (uint32_t e = 0; e < epb; e++) d[e] = x;
        }
}

// Reductions of `count` elements into dst[0] (the index is not produced here: calIndex must be false).
template <typename T>
__aicore__ void ReduceMax(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>& work, const int32_t count,
                          bool calIndex = false) {
    emu::OpScope op(PIPE_V, "ReduceMax");
    emu::CheckVectorOperand(dst, "ReduceMax");
    emu::CheckVectorOperand(src, "ReduceMax");
    emu::CheckVectorOperand(work, "ReduceMax");
    if (calIndex) EmuFail("ReduceMax: calIndex is not emulated");
    if (count <= 0) EmuFail("ReduceMax: count must be positive");
    CountVector((uint64_t)count * sizeof(T));
    const T* s = src.In(0, count);
    float m = (float)s[0];
    for (int32_t i = 1; i < count; i++) m = ((float)s[i] > m || s[i] != s[i]) ? (float)s[i] : m;
    work.Out(0, 1);
    *dst.Out(0, 1) = emu::FromF<T>(m);
}
template <typename T>
__aicore__ void ReduceSum(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>& work, const int32_t count) {
    emu::OpScope op(PIPE_V, "ReduceSum");
    emu::CheckVectorOperand(dst, "ReduceSum");
    emu::CheckVectorOperand(src, "ReduceSum");
    emu::CheckVectorOperand(work, "ReduceSum");
    if (count <= 0) EmuFail("ReduceSum: count must be positive");
    CountVector((uint64_t)count * sizeof(T));
    // Pairwise, as a tree of repeats sums on hardware.
    std::vector<float> v(count);
    const T* s = src.In(0, count);
    for (int32_t i = 0; i < count; i++) v[i] = (float)s[i];
    for (size_t w = 1; w < v.size(); w *= 2)
        for (size_t i = 0; i + w < v.size(); i += 2 * w) v[i] += v[i + w];
    work.Out(0, 1);
    *dst.Out(0, 1) = emu::FromF<T>(v[0]);
}

enum class RoundMode { CAST_NONE = 0, CAST_RINT, CAST_FLOOR, CAST_CEIL, CAST_ROUND, CAST_TRUNC, CAST_ODD };

template <typename D, typename S>
__aicore__ void Cast(const LocalTensor<D>& dst, const LocalTensor<S>& src, const RoundMode& mode, const uint32_t count) {
    emu::OpScope op(PIPE_V, "Cast");
    if (MemoryOf(dst.GetPosition()) != Memory::UB || MemoryOf(src.GetPosition()) != Memory::UB)
        EmuFail("Cast: operands must live in the unified buffer");
    dst.CheckAligned("Cast");
    src.CheckAligned("Cast");
    if (sizeof(D) < sizeof(S) && mode == RoundMode::CAST_NONE) EmuFail("Cast: narrowing needs a rounding mode");
    CountVector((uint64_t)count * (sizeof(D) > sizeof(S) ? sizeof(D) : sizeof(S)));
    D* d = dst.Out(0, count);
    const S* s = src.In(0, count);
    for (uint32_t i = 0; i < count; i++) d[i] = D((float)s[i]);  // narrowing rounds to nearest even
}

// ------------------------------------------------------------------------------------------------
// Comparison, selection and compaction (count mode: `count` contiguous elements). Bit masks are
// uint8_t tensors, element i at bit i % 8 of byte i / 8; CompareScalar writes them, Select (mode 1)
// and GatherMask read them, so the three agree on the order by construction. Emulator rule: a
// count-mode compare or select covers whole 256-byte repeats (the kernels pad their tiles).

enum class CMPMODE : uint8_t { LT = 0, GT, EQ, LE, GE, NE };
enum class SELMODE : uint8_t { VSEL_CMPMASK_SPR = 0, VSEL_TENSOR_SCALAR_MODE, VSEL_TENSOR_TENSOR_MODE };

namespace emu {
template <typename U> void CheckMaskOperand(const LocalTensor<U>& t, const char* op) {
    if (MemoryOf(t.GetPosition()) != Memory::UB) EmuFail(std::string(op) + ": the bit mask must live in the unified buffer");
    t.CheckAligned(op);
}
template <typename T> void CheckWholeRepeats(uint32_t count, const char* op) {
    if (count == 0 || (uint64_t)count * sizeof(T) % ONE_REPEAT_BYTES)
        EmuFail(std::string(op) + ": count " + std::to_string(count) + " is not a whole number of 256-byte repeats");
}
inline bool MaskBitAt(const uint8_t* bits, uint32_t i) { return (bits[i / 8] >> (i % 8)) & 1; }
}  // namespace emu

template <typename T, typename U>
__aicore__ void CompareScalar(const LocalTensor<U>& dst, const LocalTensor<T>& src0, const T src1Scalar, CMPMODE cmpMode, uint32_t count) {
    emu::OpScope op(PIPE_V, "CompareScalar");
    static_assert(std::is_same<U, uint8_t>::value, "CompareScalar writes a uint8_t bit mask");
    static_assert(std::is_same<T, float>::value || std::is_same<T, half>::value, "CompareScalar compares half or float");
    emu::CheckMaskOperand(dst, "CompareScalar");
    emu::CheckVectorOperand(src0, "CompareScalar");
    emu::CheckWholeRepeats<T>(count, "CompareScalar");
    CountVector((uint64_t)count * sizeof(T));
    const T* s = src0.In(0, count);
    uint8_t* d = dst.Out(0, count / 8);
    const float y = (float)src1Scalar;
    for (uint32_t i = 0; i < count / 8; i++) d[i] = 0;
    for (uint32_t i = 0; i < count; i++) {
        const float x = (float)s[i];
        bool r = false;
        switch (cmpMode) {
            case CMPMODE::LT: r = x < y; break;
            case CMPMODE::GT: r = x > y; break;
            case CMPMODE::EQ: r = x == y; break;
            case CMPMODE::LE: r = x <= y; break;
            case CMPMODE::GE: r = x >= y; break;
            case CMPMODE::NE: r = x != y; break;
        }
        if (r) d[i / 8] |= (uint8_t)(1u << (i % 8));
    }
}

// Select, mode 1 (VSEL_TENSOR_SCALAR_MODE): dst[i] = bit i of selMask ? src0[i] : src1.
template <typename T, typename U>
__aicore__ void Select(const LocalTensor<T>& dst, const LocalTensor<U>& selMask, const LocalTensor<T>& src0, T src1, SELMODE selMode,
                       uint32_t count) {
    emu::OpScope op(PIPE_V, "Select");
    static_assert(std::is_same<U, uint8_t>::value, "the emulated Select reads a uint8_t bit mask");
    if (selMode != SELMODE::VSEL_TENSOR_SCALAR_MODE) EmuFail("Select: only VSEL_TENSOR_SCALAR_MODE is emulated");
    emu::CheckVectorOperand(dst, "Select");
    emu::CheckVectorOperand(src0, "Select");
    emu::CheckMaskOperand(selMask, "Select");
    emu::CheckWholeRepeats<T>(count, "Select");
    CountVector((uint64_t)count * sizeof(T));
    const uint8_t* bits = selMask.In(0, count / 8);
    const T* s = src0.In(0, count);
    T* d = dst.Out(0, count);
    for (uint32_t i = 0; i < count; i++) d[i] = emu::MaskBitAt(bits, i) ? s[i] : src1;
}

struct GatherMaskParams {
    uint8_t src0BlockStride = 1;
    uint16_t repeatTimes = 1;
    uint16_t src0RepeatStride = 0;
    uint8_t src1RepeatStride = 0;
    GatherMaskParams() = default;
    GatherMaskParams(uint8_t blk, uint16_t rep, uint16_t src0Rep, uint8_t src1Rep)
        : src0BlockStride(blk), repeatTimes(rep), src0RepeatStride(src0Rep), src1RepeatStride(src1Rep) {}
};
enum class GatherMaskMode : uint8_t { VERSION_V1 = 0 };
constexpr GatherMaskMode defaultGatherMaskMode = GatherMaskMode::VERSION_V1;

// GatherMask with a user pattern (a bit mask of the element width's type), counter mode
// (reduceMode true) over `mask` elements in one repeat: the elements whose bit is set, in order,
// packed at the start of dst; rsvdCnt = how many. Other configurations are not emulated.
// rsvdCnt comes from the vector pipe, which runs behind the scalar unit: the kernel may use it
// only after a V -> S flag (or PipeBarrier<PIPE_ALL>) that covers the GatherMask. Emulator rule
// (kernels read the count right away): no instruction may issue between the two.
template <typename T, typename U, GatherMaskMode mode = defaultGatherMaskMode>
__aicore__ void GatherMask(const LocalTensor<T>& dst, const LocalTensor<T>& src0, const LocalTensor<U>& src1Pattern, const bool reduceMode,
                           const uint32_t mask, const GatherMaskParams& p, uint64_t& rsvdCnt) {
    emu::OpScope op(PIPE_V, "GatherMask");
    static_assert(sizeof(U) == sizeof(T) && (sizeof(U) == 2 || sizeof(U) == 4), "the pattern type matches the element width");
    emu::CheckVectorOperand(dst, "GatherMask");
    emu::CheckVectorOperand(src0, "GatherMask");
    emu::CheckMaskOperand(src1Pattern, "GatherMask");
    if (!reduceMode || p.repeatTimes != 1 || p.src0BlockStride != 1)
        EmuFail("GatherMask: only counter mode (reduceMode true) over one repeat with src0BlockStride 1 is emulated");
    if (mask == 0) EmuFail("GatherMask: counter mode needs a positive element count");
    CountVector((uint64_t)mask * sizeof(T));
    const uint8_t* bits = src1Pattern.template ReinterpretCast<uint8_t>().In(0, (mask + 7) / 8);
    const T* s = src0.In(0, mask);
    std::vector<T> kept;
    for (uint32_t i = 0; i < mask; i++)
        if (emu::MaskBitAt(bits, i)) kept.push_back(s[i]);
    if (!kept.empty()) std::memcpy(dst.Out(0, (uint32_t)kept.size()), kept.data(), kept.size() * sizeof(T));
    rsvdCnt = kept.size();
    Core().remain_seq = Core().pipes.current.seq;
}

// ------------------------------------------------------------------------------------------------
// Sorting (A2 layout: 8-byte (score, index) structures, score in the low 4 bytes for float).

// Sorts each group of 32 (score, index) inputs by descending score into dst; on equal scores the
// earlier input comes first (the documented tie rule). Groups are not merged with each other.
template <typename T>
__aicore__ void Sort32(const LocalTensor<T>& dst, const LocalTensor<T>& src0, const LocalTensor<uint32_t>& src1, const int32_t repeatTime) {
    emu::OpScope op(PIPE_V, "Sort32");
    static_assert(sizeof(T) == 4, "emulated Sort32 handles float scores");
    emu::CheckVectorOperand(dst, "Sort32");
    emu::CheckVectorOperand(src0, "Sort32");
    emu::CheckVectorOperand(src1, "Sort32");
    if (repeatTime < 0 || repeatTime > 255) EmuFail("Sort32: repeatTime " + std::to_string(repeatTime) + " outside 0..255");
    const uint32_t n = 32u * (uint32_t)repeatTime;
    CountVector((uint64_t)n * 8);
    const T* sc = src0.In(0, n);
    const uint32_t* ix = src1.In(0, n);
    std::vector<std::pair<T, uint32_t>> v(n);
    for (uint32_t i = 0; i < n; i++) v[i] = {sc[i], ix[i]};
    for (uint32_t g = 0; g < n; g += 32)
        std::stable_sort(v.begin() + g, v.begin() + g + 32, [](const auto& a, const auto& b) { return a.first > b.first; });
    T* d = dst.Out(0, 2 * n);
    for (uint32_t i = 0; i < n; i++) {
        d[2 * i] = v[i].first;
        std::memcpy(&d[2 * i + 1], &v[i].second, 4);
    }
}

template <typename T> struct MrgSortSrcList {
    MrgSortSrcList() = default;
    MrgSortSrcList(const LocalTensor<T>& a, const LocalTensor<T>& b, const LocalTensor<T>& c, const LocalTensor<T>& d)
        : src1(a), src2(b), src3(c), src4(d) {}
    LocalTensor<T> src1, src2, src3, src4;
};

struct MrgSort4Info {
    uint16_t elementLengths[4] = {0, 0, 0, 0};  // structures per list, each at most 4095
    bool ifExhaustedSuspension = false;
    uint16_t validBit = 0;  // lists in use: 0b0011, 0b0111 or 0b1111
    uint16_t repeatTimes = 1;
    MrgSort4Info() = default;
    MrgSort4Info(const uint16_t len[4], bool suspend, uint16_t valid, uint16_t repeat)
        : ifExhaustedSuspension(suspend), validBit(valid), repeatTimes(repeat) {
        for (int i = 0; i < 4; i++) elementLengths[i] = len[i];
    }
};

// Merges 2-4 lists sorted by descending score into dst. Emulator rules: lists must be sorted
// (the hardware's result is undefined otherwise), at most 4095 structures each, 8-byte aligned,
// not overlapping dst. On equal scores the lower-numbered list goes first (assumed: the
// documentation states no rule across lists; the kernels put the earlier positions in list 1).
template <typename T> __aicore__ void MrgSort(const LocalTensor<T>& dst, const MrgSortSrcList<T>& src, const MrgSort4Info& info) {
    emu::OpScope op(PIPE_V, "MrgSort");
    static_assert(sizeof(T) == 4, "emulated MrgSort handles float scores");
    emu::CheckVectorOperand(dst, "MrgSort");
    if (info.repeatTimes != 1) EmuFail("MrgSort: only repeatTimes 1 is emulated");
    if (info.ifExhaustedSuspension) EmuFail("MrgSort: ifExhaustedSuspension is not emulated");
    int lists = 0;
    if (info.validBit == 0x3) lists = 2;
    else if (info.validBit == 0x7) lists = 3;
    else if (info.validBit == 0xf) lists = 4;
    else EmuFail("MrgSort: validBit " + std::to_string(info.validBit) + " is not 0b11, 0b111 or 0b1111");
    const LocalTensor<T>* l[4] = {&src.src1, &src.src2, &src.src3, &src.src4};
    std::vector<std::pair<T, uint32_t>> out;
    std::vector<std::vector<std::pair<T, uint32_t>>> in(lists);
    uint32_t total = 0;
    for (int k = 0; k < lists; k++) {
        const uint32_t n = info.elementLengths[k];
        if (n > 4095) EmuFail("MrgSort: list " + std::to_string(k + 1) + " has " + std::to_string(n) + " structures (at most 4095)");
        if (l[k]->Offset() % 8) EmuFail("MrgSort: list " + std::to_string(k + 1) + " is not 8-byte aligned");
        if (MemoryOf(l[k]->GetPosition()) != Memory::UB) EmuFail("MrgSort: lists must live in the unified buffer");
        const T* p = l[k]->In(0, 2 * n);
        for (uint32_t i = 0; i < n; i++) {
            uint32_t ix;
            std::memcpy(&ix, &p[2 * i + 1], 4);
            if (i > 0 && p[2 * i] > p[2 * i - 2])
                EmuFail("MrgSort: list " + std::to_string(k + 1) + " is not sorted by descending score at structure " + std::to_string(i));
            in[k].push_back({p[2 * i], ix});
        }
        const uint32_t lo = l[k]->Offset(), hi = lo + 8 * n, dlo = dst.Offset(), dhi = dlo + 8 * (total + n);
        if (n && lo < dhi && dlo < hi && l[k]->Owner() == dst.Owner()) EmuFail("MrgSort: dst overlaps list " + std::to_string(k + 1));
        total += n;
    }
    CountVector((uint64_t)total * 8);
    std::vector<size_t> at(lists, 0);
    for (uint32_t o = 0; o < total; o++) {
        int best = -1;
        for (int k = 0; k < lists; k++)
            if (at[k] < in[k].size() && (best < 0 || in[k][at[k]].first > in[best][at[best]].first)) best = k;
        out.push_back(in[best][at[best]++]);
    }
    T* d = dst.Out(0, 2 * total);
    for (uint32_t i = 0; i < total; i++) {
        d[2 * i] = out[i].first;
        std::memcpy(&d[2 * i + 1], &out[i].second, 4);
    }
}

// ------------------------------------------------------------------------------------------------
// Cube unit (AIC): GM -> L1 with ND->NZ, L1 -> L0A/L0B in 512-byte fractals, Mmad into L0C,
// Fixpipe L0C -> GM with NZ->ND. Layouts (A2, from the public API reference):
//   L1 "NZ" after Nd2Nz: 32-byte pieces of each row at (row·dstNzNStride + piece·dstNzC0Stride)·32 B;
//   L0A "zZ": 16 × C0 fractals row-major over (m-block, k-block), row-major inside;
//   L0B "nZ": C0 × 16 fractals row-major over (k-block, n-block), column-major inside;
//   L0C "NZ": 16 × 16 f32 fractals, fractal (mb, nb) at (nb·Mpad/16 + mb)·256, row-major inside.
// C0 = 32 bytes / sizeof(T) (16 for half/bf16).

struct Nd2NzParams {
    uint16_t ndNum = 1, nValue = 0, dValue = 0, srcNdMatrixStride = 0, srcDValue = 0;
    uint16_t dstNzC0Stride = 1, dstNzNStride = 1, dstNzMatrixStride = 0;
    Nd2NzParams() = default;
    Nd2NzParams(uint16_t nd, uint16_t n, uint16_t d, uint16_t srcMat, uint16_t srcD, uint16_t c0Stride, uint16_t nStride, uint16_t dstMat)
        : ndNum(nd), nValue(n), dValue(d), srcNdMatrixStride(srcMat), srcDValue(srcD), dstNzC0Stride(c0Stride), dstNzNStride(nStride),
          dstNzMatrixStride(dstMat) {}
};

template <typename T> __aicore__ void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const Nd2NzParams& p) {
    emu::OpScope op(PIPE_MTE2, "DataCopy(Nd2Nz GM->L1)");
    if (MemoryOf(dst.GetPosition()) != Memory::L1) EmuFail("DataCopy with Nd2NzParams: the destination must be A1/B1 (L1)");
    dst.CheckAligned("DataCopy(Nd2Nz)");
    if (p.srcDValue == 0 || p.dstNzC0Stride == 0 || p.dstNzNStride == 0) EmuFail("DataCopy(Nd2Nz): zero stride");
    const uint32_t c0 = ONE_BLK_SIZE / sizeof(T), pieces = (p.dValue + c0 - 1) / c0;
    for (uint32_t i = 0; i < p.ndNum; i++)
        for (uint32_t j = 0; j < p.nValue; j++)
            for (uint32_t k = 0; k < pieces; k++) {
                const uint32_t n = (k + 1) * c0 <= p.dValue ? c0 : p.dValue - k * c0;
                const T* from = src.Read((uint64_t)i * p.srcNdMatrixStride + (uint64_t)j * p.srcDValue + k * c0, n);
                T* to = dst.Out(i * p.dstNzMatrixStride + (j * p.dstNzNStride + k * p.dstNzC0Stride) * c0, c0);
                for (uint32_t e = 0; e < c0; e++) to[e] = e < n ? from[e] : T(0.0f);  // the row's last piece is zero-filled
                AddCount(Count::GmRead, n * sizeof(T));
            }
}

struct LoadData2DParams {
    uint16_t startIndex = 0;
    uint8_t repeatTimes = 0;
    uint16_t srcStride = 0;
    uint8_t sid = 0;
    uint16_t dstGap = 0;
    bool ifTranspose = false;
    uint8_t addrMode = 0;
};

constexpr uint32_t FRACTAL_BYTES = 512;

template <typename T> __aicore__ void LoadData(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LoadData2DParams& p) {
    emu::OpScope op(PIPE_MTE1, "LoadData");
    const Memory dm = MemoryOf(dst.GetPosition());
    if (MemoryOf(src.GetPosition()) != Memory::L1 || (dm != Memory::L0A && dm != Memory::L0B))
        EmuFail("LoadData: moves A1 -> A2 or B1 -> B2 (L1 -> L0A/L0B)");
    src.CheckAligned("LoadData");
    if (dst.Offset() % FRACTAL_BYTES) EmuFail("LoadData: L0A/L0B address " + std::to_string(dst.Offset()) + " is not 512-byte aligned");
    if (p.ifTranspose && sizeof(T) != 2) EmuFail("LoadData: ifTranspose is for 16-bit types only");
    if (p.addrMode != 0) EmuFail("LoadData: only addrMode 0 (increasing) is emulated");
    const uint32_t per = FRACTAL_BYTES / sizeof(T);
    for (uint32_t r = 0; r < p.repeatTimes; r++) {
        const T* from = src.In((p.startIndex + r * p.srcStride) * per, per);
        T* to = dst.Out(r * (p.dstGap + 1) * per, per);
        for (uint32_t e = 0; e < per; e++) to[e] = p.ifTranspose ? from[(e % 16) * 16 + e / 16] : from[e];
    }
}

struct MmadParams {
    uint16_t m = 0, n = 0, k = 0;
    bool isBias = false;
    int32_t fmOffset = 0;
    bool enSsparse = false, enWinogradA = false, enWinogradB = false;
    uint8_t unitFlag = 0;
    bool kDirectionAlign = false, cmatrixSource = false, cmatrixInitVal = true;
};

// C (+)= A·B over whole fractals: padded rows/columns of A and B take part (their results are
// dropped by Fixpipe), and the K padding is summed too, so it must hold zeros (or finite data
// against zeros), as it would on the hardware.
template <typename C, typename A, typename B>
__aicore__ void Mmad(const LocalTensor<C>& dst, const LocalTensor<A>& fm, const LocalTensor<B>& filter, const MmadParams& p) {
    emu::OpScope op(PIPE_M, "Mmad");
    static_assert(std::is_same<C, float>::value && std::is_same<A, B>::value, "emulated Mmad: f32 accumulation of equal input types");
    if (MemoryOf(dst.GetPosition()) != Memory::L0C || MemoryOf(fm.GetPosition()) != Memory::L0A ||
        MemoryOf(filter.GetPosition()) != Memory::L0B)
        EmuFail("Mmad: dst in CO1 (L0C), fm in A2 (L0A), filter in B2 (L0B)");
    if (fm.Offset() % FRACTAL_BYTES || filter.Offset() % FRACTAL_BYTES) EmuFail("Mmad: L0A/L0B operands must be 512-byte aligned");
    if (dst.Offset() % 64) EmuFail("Mmad: L0C operand must be 64-byte aligned");
    if (p.m > 4095 || p.n > 4095 || p.k > 4095) EmuFail("Mmad: m, n, k must be at most 4095");
    if (p.isBias || (!p.cmatrixInitVal && p.cmatrixSource)) EmuFail("Mmad: bias is not emulated");
    const uint32_t c0 = ONE_BLK_SIZE / sizeof(A);
    const uint32_t mp = (p.m + 15) / 16 * 16, np = (p.n + 15) / 16 * 16, kp = (p.k + c0 - 1) / c0 * c0;
    const uint32_t kt = kp / c0, nt = np / 16;
    AddCount(Count::CubeMacs, (uint64_t)mp * np * kp);
    const A* a = fm.In(0, mp * kp);
    const B* b = filter.In(0, kp * np);
    C* c = dst.Out(0, mp * np);
    // m = 1 runs the cube in GEMV mode (Mmad page 07_0249 and the C API's disable_gemv flag; the
    // Matmul guide's GEMV page: A of shape (1, K) is a vector): L0A is read as K contiguous
    // elements, not as a zZ fractal row, and the other 15 rows of the result are undefined.
    const bool gemv = p.m == 1;
    for (uint32_t m = 0; m < mp; m++)
        for (uint32_t n = 0; n < np; n++) {
            C& out = c[((n / 16) * (mp / 16) + m / 16) * 256 + (m % 16) * 16 + n % 16];
            if (gemv && m > 0) {
                std::memset(static_cast<void*>(&out), 0xff, sizeof(C));  // undefined: poison
                continue;
            }
            float acc = 0;
            for (uint32_t k = 0; k < kp; k++) {
                const float x = (float)a[gemv ? k : ((m / 16) * kt + k / c0) * 16 * c0 + (m % 16) * c0 + k % c0];
                const float y = (float)b[((k / c0) * nt + n / 16) * 16 * c0 + (n % 16) * c0 + k % c0];
                acc += x * y;
            }
            out = p.cmatrixInitVal ? acc : out + acc;
        }
}

enum QuantMode_t { NoQuant = 0, F322F16 = 1, F322BF16 = 2 };
struct FixpipeConfig {
    bool rowMajor;
};
constexpr FixpipeConfig CFG_ROW_MAJOR = {true};
constexpr FixpipeConfig CFG_NZ = {false};

struct FixpipeParamsV220 {
    uint16_t nSize = 0, mSize = 0, srcStride = 0;
    uint32_t dstStride = 0;
    QuantMode_t quantPre = NoQuant;
    uint64_t deqScalar = 0;
    uint16_t ndNum = 1, srcNdStride = 0, dstNdStride = 0;
    bool reluEn = false;
    uint8_t unitFlag = 0;
    bool isChannelSplit = false;
};

template <typename T, typename U, const FixpipeConfig& config = CFG_ROW_MAJOR>
__aicore__ void Fixpipe(const GlobalTensor<T>& dst, const LocalTensor<U>& src, const FixpipeParamsV220& p) {
    emu::OpScope op(PIPE_FIX, "Fixpipe");
    static_assert(std::is_same<U, float>::value, "emulated Fixpipe reads f32 from L0C");
    if (!config.rowMajor) EmuFail("Fixpipe: only CFG_ROW_MAJOR (NZ -> ND) is emulated");
    if (MemoryOf(src.GetPosition()) != Memory::L0C) EmuFail("Fixpipe: the source must be CO1 (L0C)");
    if (src.Offset() % 64) EmuFail("Fixpipe: L0C source must be 64-byte aligned");
    if (p.srcStride % 16 || p.srcStride < p.mSize) EmuFail("Fixpipe: srcStride must be a multiple of 16 covering mSize");
    if (p.ndNum != 1 || p.reluEn) EmuFail("Fixpipe: only ndNum 1 without ReLU is emulated");
    const bool want_f32 = std::is_same<T, float>::value;
    if (want_f32 != (p.quantPre == NoQuant) || (std::is_same<T, half>::value && p.quantPre != F322F16) ||
        (std::is_same<T, bfloat16_t>::value && p.quantPre != F322BF16))
        EmuFail("Fixpipe: quantPre does not match the destination type");
    const uint32_t np = (p.nSize + 15) / 16 * 16;
    const U* c = src.In(0, (uint32_t)p.srcStride * np);
    for (uint32_t m = 0; m < p.mSize; m++) {
        T* row = dst.Write((uint64_t)m * p.dstStride, p.nSize);
        for (uint32_t n = 0; n < p.nSize; n++) row[n] = T(c[(n / 16) * p.srcStride * 16 + m * 16 + n % 16]);
    }
    AddCount(Count::GmWrite, (uint64_t)p.mSize * p.nSize * sizeof(T));
}

// ------------------------------------------------------------------------------------------------
// Synchronisation

enum class HardEvent : int { MTE2_V, V_MTE2, MTE3_V, V_MTE3, MTE2_MTE3, MTE3_MTE2, S_V, V_S, MTE2_S, S_MTE2, MTE3_S, S_MTE3, M_V, V_M, MTE1_M, M_MTE1, FIX_M, M_FIX, MTE2_MTE1, MTE1_MTE2, MTE2_M, M_MTE2, FIX_MTE2, MTE2_FIX, S_FIX, FIX_S };

namespace emu {
// The pipe that sets (src) and the pipe that waits (dst) for each event (SetFlag/WaitFlag page:
// "MTE2_V" is set on MTE2 and waited on V).
struct EventPipes {
    int src, dst;
};
constexpr EventPipes PipesOf(HardEvent e) {
    constexpr EventPipes table[] = {
        {PIPE_MTE2, PIPE_V}, {PIPE_V, PIPE_MTE2}, {PIPE_MTE3, PIPE_V}, {PIPE_V, PIPE_MTE3}, {PIPE_MTE2, PIPE_MTE3},
        {PIPE_MTE3, PIPE_MTE2}, {PIPE_S, PIPE_V}, {PIPE_V, PIPE_S}, {PIPE_MTE2, PIPE_S}, {PIPE_S, PIPE_MTE2},
        {PIPE_MTE3, PIPE_S}, {PIPE_S, PIPE_MTE3}, {PIPE_M, PIPE_V}, {PIPE_V, PIPE_M}, {PIPE_MTE1, PIPE_M},
        {PIPE_M, PIPE_MTE1}, {PIPE_FIX, PIPE_M}, {PIPE_M, PIPE_FIX}, {PIPE_MTE2, PIPE_MTE1}, {PIPE_MTE1, PIPE_MTE2},
        {PIPE_MTE2, PIPE_M}, {PIPE_M, PIPE_MTE2}, {PIPE_FIX, PIPE_MTE2}, {PIPE_MTE2, PIPE_FIX}, {PIPE_S, PIPE_FIX},
        {PIPE_FIX, PIPE_S},
    };
    return table[(int)e];
}
std::string EventName(HardEvent e);
void OnRemainCountSync(int dst);  // GatherMask's count becomes readable (see GatherMask)
}  // namespace emu

// SetFlag<X_Y> is issued on X: the flag is set once every earlier X instruction is done; WaitFlag
// holds Y's later instructions until then.
template <HardEvent E> __aicore__ void SetFlag(int32_t id) {
    CoreState& c = Core();
    int& n = c.flags[{(int)E, id}];
    if (n > 0) EmuFail("SetFlag twice on event " + emu::EventName(E) + " id " + std::to_string(id) + " without a WaitFlag between");
    n++;
    c.flag_clocks[{(int)E, id}] = c.pipes.Release(emu::PipesOf(E).src);
}
template <HardEvent E> __aicore__ void WaitFlag(int32_t id) {
    CoreState& c = Core();
    int& n = c.flags[{(int)E, id}];
    if (n == 0) EmuFail("WaitFlag on event " + emu::EventName(E) + " id " + std::to_string(id) + " with no SetFlag (the hardware would hang)");
    n--;
    c.pipes.Acquire(emu::PipesOf(E).dst, c.flag_clocks[{(int)E, id}]);
    emu::OnRemainCountSync(emu::PipesOf(E).dst);
}
// PipeBarrier<P>: P's later instructions wait for its earlier ones (PIPE_ALL: everything waits
// for everything). PIPE_S is a hardware error (the PipeBarrier page).
template <pipe_t P> __aicore__ void PipeBarrier() {
    static_assert(P != PIPE_S, "PipeBarrier<PIPE_S> raises a hardware error (scalar order is kept by the hardware)");
    Core().pipes.Barrier(P);
    if (P == PIPE_ALL) emu::OnRemainCountSync(PIPE_S);
}

// Cross-core flags of a mixed launch (A2: one AIC with two AIVs). Mode 2: an AIC's set reaches
// both of its AIVs; an AIC's wait needs the set of both AIVs; an AIV's set and wait pair with its
// AIC. Flag ids 0..10. Emulator rules: a wait that can never be satisfied (every core of the
// group waiting) is a deadlock; a set never waited for at the end of the launch is an error.
void CrossCoreSet(int mode, int32_t id, int pipe);
void CrossCoreWait(int32_t id);

// The cross-core flags live at the device's hardware synchronisation address: the host reads it
// with aclrtGetHardwareSyncAddr and passes it to the mixed kernel, which gives it to
// SetSyncBaseAddr on the AIC and on the AIVs before any CrossCoreSetFlag/WaitFlag (catlass's
// flash-attention example; the SetSyncBaseAddr page). Emulator rule: a flag before it, or with
// another address, fails.
void SetSyncBaseAddr(uint64_t config);

// A mixed kernel declares its task type (KERNEL_TASK_TYPE_DEFAULT page: KERNEL_TYPE_MIX_AIC_1_2
// is one AIC with two AIVs, as A2's AI core is split); the emulator fails a mixed launch whose
// cores did not.
enum KernelMetaType { KERNEL_TYPE_AIV_ONLY, KERNEL_TYPE_AIC_ONLY, KERNEL_TYPE_MIX_AIV_1_0, KERNEL_TYPE_MIX_AIC_1_0,
                      KERNEL_TYPE_MIX_AIC_1_1, KERNEL_TYPE_MIX_AIC_1_2 };
void DeclareTaskType(KernelMetaType type);
// The set is an instruction of `pipe`: it takes effect once `pipe`'s earlier instructions are done
// (CrossCoreSetFlag page; PIPE_S and PIPE_ALL are not accepted there).
template <uint8_t modeId, pipe_t pipe> __aicore__ void CrossCoreSetFlag(int32_t flagId) {
    static_assert(pipe != PIPE_S && pipe != PIPE_ALL, "CrossCoreSetFlag takes a hardware pipe other than PIPE_S and PIPE_ALL");
    CrossCoreSet(modeId, flagId, pipe);
}
__aicore__ inline void CrossCoreWaitFlag(int32_t flagId) { CrossCoreWait(flagId); }

// ------------------------------------------------------------------------------------------------
// Block info

__aicore__ int64_t GetBlockIdx();
__aicore__ int64_t GetBlockNum();
__aicore__ int64_t GetSubBlockIdx();
__aicore__ int64_t GetSubBlockNum();

}  // namespace AscendC

// Which core the code runs on (compile-time on the device, where each is built separately).
#define KERNEL_TASK_TYPE_DEFAULT(type) AscendC::DeclareTaskType(AscendC::type)
#define ASCEND_IS_AIC (AscendC::Core().cube)
#define ASCEND_IS_AIV (!AscendC::Core().cube)

// On the device `half` and `bfloat16_t` are global types of the compiler and its headers.
using AscendC::bfloat16_t;
using AscendC::half;
// pipe_t and its values are global names of the device compiler too.
using AscendC::pipe_t;
using AscendC::PIPE_ALL;
using AscendC::PIPE_FIX;
using AscendC::PIPE_M;
using AscendC::PIPE_MTE1;
using AscendC::PIPE_MTE2;
using AscendC::PIPE_MTE3;
using AscendC::PIPE_S;
using AscendC::PIPE_V;

// ------------------------------------------------------------------------------------------------
// Emulator entry: runs `body` once per core, each with fresh, poisoned memories; rethrows the
// first EmuError prefixed with the core index; checks leaks and unpaired flags at each core's end.

namespace ekemu {
void RunCores(uint32_t block_dim, void (*body)(void*), void* ctx);
// A mixed launch: `block_dim` groups of one AIC and two AIVs, the three cores of a group run
// concurrently (threads), groups one after another.
void RunMixCores(uint32_t block_dim, void (*body)(void*), void* ctx);

template <typename F> void Launch(uint32_t block_dim, F&& f) {
    RunCores(block_dim, [](void* c) { (*static_cast<F*>(c))(); }, &f);
}
template <typename F> void LaunchMix(uint32_t block_dim, F&& f) {
    RunMixCores(block_dim, [](void* c) { (*static_cast<F*>(c))(); }, &f);
}
}  // namespace ekemu

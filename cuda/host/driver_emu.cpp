// A test double of the CUDA driver library (feature `cuda-emu`): built as a shared object whose
// SONAME is `libcuda.so`, so once `cuda::emulator()` has loaded it, cudarc's run-time loading of
// "libcuda.so" finds it and the whole CUDA backend — argument packing, launch configurations,
// buffers, the kernels themselves — runs on the host. The kernels of cuda/ are compiled here
// unchanged against grid_shim.h; functions are looked up by name in the table below.
//
// Devices: four, with the limits of the CUDA C++ Programming Guide's "Technical Specifications per
// Compute Capability" table — 0: compute capability 9.0 (H100: 227 KiB of shared memory per block
// by opt-in, 132 SMs), 1: 8.0 (A100: 163 KiB, 108 SMs), 2: 8.6 and 3: 8.9 (99 KiB). Each device
// refuses what its driver would, from an independent source of truth, the kernels as NVRTC
// compiled them (kernel_attrs.h, generated and kept fresh by tests/cuda_compile.rs):
// - a module image without code for the device: cubin for another major version or a newer minor
//   (ELF e_flags), PTX for a newer target or a newer ISA than CUDA 13.0's (CUDA_ERROR_NO_BINARY_FOR_GPU,
//   CUDA_ERROR_UNSUPPORTED_PTX_VERSION);
// - a launch whose block exceeds the kernel's launch bound (.maxntid), whose dynamic shared memory
//   exceeds the function's limit (48 KiB less its static shared memory unless raised), whose static
//   plus dynamic shared memory exceeds the device's opt-in limit (CUDA_ERROR_INVALID_VALUE), or
//   whose registers (per warp, in 256-register units) exceed the SM's 64K
//   (CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES); cuFuncSetAttribute raising the dynamic limit beyond the
//   opt-in limit less the static size (CUDA_ERROR_INVALID_VALUE); and cuFuncGetAttribute reports
//   the kernel's real launch bound, static shared memory and registers.
// Memory is host memory: each allocation starts 16-byte aligned with guard bytes before it and in
// the few bytes rounding it up to 16, and ends against an inaccessible page. A kernel that writes
// into guard bytes fails its launch (CUDA_ERROR_ILLEGAL_ADDRESS); one that reads or writes 16 or
// more bytes past an allocation's end (or any address that is not memory) faults, and the emulator
// reports the kernel, block and thread on stderr and ends the process (there is no recovering a
// launch from inside a fiber). Copies and memsets must stay inside one allocation. A launch that
// breaks a grid_shim.h rule fails with CUDA_ERROR_LAUNCH_FAILED, and cuGetErrorString then
// returns the violation.
// Streams: every operation completes before its call returns, but the emulator keeps the order the
// hardware would guarantee — per stream, and across streams only through events, stream waits and
// synchronisations — as vector clocks, and reports an operation that touches an allocation an
// unordered operation of another stream wrote (or, for a write, read), like compute-sanitizer's
// racecheck does for shared memory: the call fails with CUDA_ERROR_ILLEGAL_STATE and says which
// operations race. Kernels touch the buffers their params struct addresses (ACCESS tables below).
// Memory pools are reported (stream-ordered cuMemAllocAsync/cuMemFreeAsync, as on an H100).
// Stream capture (cuStreamBeginCapture … cuGraphLaunch): see "Stream capture" below.

#include "grid_shim.h"

#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <cstdio>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "../../ffi/entropy_params.h"
#include "../common.cuh"
#include "../numerics.cuh"
#include "../topk.cuh"
#include "../decode.cu"
#include "../attend.cu"
#include "../append.cu"
#include "../prefill.cu"
#include "../plan.cu"
#include "../compress.cu"

#define EXPORT extern "C" __attribute__((visibility("default")))

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUevent;
typedef void* CUmodule;
typedef void* CUgraph;
typedef void* CUgraphExec;

namespace {

// CUresult codes (cuda.h).
constexpr CUresult SUCCESS = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, INVALID_IMAGE = 200,
                   NO_BINARY_FOR_GPU = 209, UNSUPPORTED_PTX_VERSION = 222, INVALID_DEVICE = 101,
                   INVALID_HANDLE = 400, ILLEGAL_STATE = 401, NOT_FOUND = 500, ILLEGAL_ADDRESS = 700,
                   LAUNCH_OUT_OF_RESOURCES = 701, LAUNCH_FAILED = 719, STREAM_CAPTURE_UNSUPPORTED = 900,
                   STREAM_CAPTURE_INVALIDATED = 901, STREAM_CAPTURE_ISOLATION = 905, CAPTURED_EVENT = 907;

// Guard bytes before an allocation (and in its tail up to the 16-byte grid), and their pattern.
constexpr size_t GUARD = 256;
constexpr size_t ALIGN = 16;
constexpr unsigned char GUARD_BYTE = 0xA5;
// Fresh allocations are poisoned (NaN for every float type) so unwritten reads show up.
constexpr unsigned char POISON_BYTE = 0xFF;
// Every device: 48 KiB of dynamic shared memory per block unless a function raises its limit,
// 64K 32-bit registers per SM (and per block), allocated per warp in units of 256.
constexpr int SHARED_PER_BLOCK = 48 * 1024, REGISTERS_PER_SM = 64 * 1024, REGISTER_UNIT = 256;
// The newest PTX ISA the emulated driver (CUDA 13.0) JIT-compiles.
constexpr int PTX_ISA_MAX = 90;

// The emulated devices (CUDA C++ Programming Guide, "Technical Specifications per Compute
// Capability"): opt-in shared memory per block and per SM, multiprocessors of a typical part,
// threads per SM, and the kernel_attrs.h column their code comes from (0: sm_80, 1: sm_90a).
struct Device {
    const char* name;
    int cc, optin, per_sm, sms, threads_per_sm, column;
};
constexpr Device DEVICES[] = {
    {"entropy-kernels CUDA host emulator (sm_90)", 90, 227 * 1024, 228 * 1024, 132, 2048, 1},
    {"entropy-kernels CUDA host emulator (sm_80)", 80, 163 * 1024, 164 * 1024, 108, 2048, 0},
    {"entropy-kernels CUDA host emulator (sm_86)", 86, 99 * 1024, 100 * 1024, 84, 1536, 0},
    {"entropy-kernels CUDA host emulator (sm_89)", 89, 99 * 1024, 100 * 1024, 142, 1536, 0},
};
constexpr int DEVICE_COUNT = sizeof(DEVICES) / sizeof(DEVICES[0]);

// What NVRTC compiled (kernel_attrs.h): launch bound, and per column static shared memory and
// registers per thread.
struct KernelAttrs {
    const char* name;
    int max_threads;
    int static_smem[2];
    int registers[2];
};
#define EK_KERNEL_ATTRS(name, threads, smem80, regs80, smem90, regs90) {#name, threads, {smem80, smem90}, {regs80, regs90}},
constexpr KernelAttrs KERNEL_ATTRS[] = {
#include "kernel_attrs.h"
};
#undef EK_KERNEL_ATTRS

const KernelAttrs* attrs_of(const char* name) {
    for (const auto& a : KERNEL_ATTRS)
        if (std::strcmp(a.name, name) == 0) return &a;
    return nullptr;
}

// A buffer a kernel's params address, and whether the kernel may write it.
struct Access {
    size_t offset;
    bool write;
};
// The pointer fields of each params struct: inputs are read, the rest may be written.
#define R(T, f) Access{offsetof(T, f), false}
#define W(T, f) Access{offsetof(T, f), true}
template <typename P> struct Accesses;
template <> struct Accesses<EkPrefillParams> {
    static constexpr Access list[] = {R(EkPrefillParams, q.ptr), R(EkPrefillParams, k.ptr), R(EkPrefillParams, v.ptr),
                                      W(EkPrefillParams, out.ptr), W(EkPrefillParams, lse), R(EkPrefillParams, offsets),
                                      R(EkPrefillParams, counts), R(EkPrefillParams, indices), W(EkPrefillParams, workspace)};
};
template <> struct Accesses<EkPlanParams> {
    static constexpr Access list[] = {R(EkPlanParams, q.ptr), R(EkPlanParams, k.ptr), W(EkPlanParams, qsum),
                                      W(EkPlanParams, krep), W(EkPlanParams, key), W(EkPlanParams, logits),
                                      W(EkPlanParams, scores), R(EkPlanParams, prev), W(EkPlanParams, entropy),
                                      W(EkPlanParams, budgets), W(EkPlanParams, keep), W(EkPlanParams, topk),
                                      W(EkPlanParams, classes), W(EkPlanParams, order),
                                      R(EkPlanParams, block_table), W(EkPlanParams, states)};
};
template <> struct Accesses<EkCompressParams> {
    static constexpr Access list[] = {
        R(EkCompressParams, k_cache.ptr), R(EkCompressParams, v_cache.ptr), R(EkCompressParams, obs.ptr),
        W(EkCompressParams, stats),       W(EkCompressParams, means),       W(EkCompressParams, pooled),
        W(EkCompressParams, selected),    W(EkCompressParams, k_out),       W(EkCompressParams, v_out),
        W(EkCompressParams, workspace),   W(EkCompressParams, lengths),     W(EkCompressParams, floor_sel),
        W(EkCompressParams, extra_sel)};
};
template <> struct Accesses<EkDecodeParams> {
    static constexpr Access list[] = {R(EkDecodeParams, q.ptr),       R(EkDecodeParams, k_cache.ptr),
                                      R(EkDecodeParams, v_cache.ptr), W(EkDecodeParams, out.ptr),
                                      R(EkDecodeParams, lengths),     W(EkDecodeParams, partial)};
};
template <> struct Accesses<EkAttendParams> {
    static constexpr Access list[] = {
        R(EkAttendParams, q.ptr),       W(EkAttendParams, out.ptr), W(EkAttendParams, lse),
        R(EkAttendParams, k_pool),      R(EkAttendParams, v_pool),  R(EkAttendParams, block_table),
        R(EkAttendParams, tiles),       R(EkAttendParams, offsets), R(EkAttendParams, counts),
        R(EkAttendParams, indices),     W(EkAttendParams, partial)};
};
template <> struct Accesses<EkAppendParams> {
    static constexpr Access list[] = {R(EkAppendParams, k_new.ptr), R(EkAppendParams, v_new.ptr),
                                      W(EkAppendParams, k_pool),    W(EkAppendParams, v_pool),
                                      R(EkAppendParams, block_table), R(EkAppendParams, cu_q),
                                      W(EkAppendParams, lens)};
};
template <> struct Accesses<EkProbeParams> {
    static constexpr Access list[] = {R(EkProbeParams, x), R(EkProbeParams, y), W(EkProbeParams, out)};
};
#undef R
#undef W

struct Kernel {
    const char* name;
    void (*run)(void** args);
    size_t params_size;
    const Access* access;
    size_t accesses;
    std::atomic<unsigned> launches{0};
};

#define EK_KERNEL(name, Params)                                                                   \
    {#name, [](void** a) { name(*static_cast<Params*>(a[0])); }, sizeof(Params), Accesses<Params>::list, \
     sizeof(Accesses<Params>::list) / sizeof(Access), {}},
Kernel kernels[] = {
    EK_KERNEL(ek_decode_split_f32_v4, EkDecodeParams)
    EK_KERNEL(ek_decode_split_f32_v1, EkDecodeParams)
    EK_KERNEL(ek_decode_split_f16_v8, EkDecodeParams)
    EK_KERNEL(ek_decode_split_f16_v1, EkDecodeParams)
    EK_KERNEL(ek_decode_split_bf16_v8, EkDecodeParams)
    EK_KERNEL(ek_decode_split_bf16_v1, EkDecodeParams)
    EK_KERNEL(ek_decode_merge_f32, EkDecodeParams)
    EK_KERNEL(ek_decode_merge_f16, EkDecodeParams)
    EK_KERNEL(ek_decode_merge_bf16, EkDecodeParams)
    EK_KERNEL(ek_attend_split_f32, EkAttendParams)
    EK_KERNEL(ek_attend_split_f16, EkAttendParams)
    EK_KERNEL(ek_attend_split_bf16, EkAttendParams)
    EK_KERNEL(ek_attend_merge_f32, EkAttendParams)
    EK_KERNEL(ek_attend_merge_f16, EkAttendParams)
    EK_KERNEL(ek_attend_merge_bf16, EkAttendParams)
    EK_KERNEL(ek_append_f32, EkAppendParams)
    EK_KERNEL(ek_append_f16, EkAppendParams)
    EK_KERNEL(ek_append_bf16, EkAppendParams)
    EK_KERNEL(ek_append_lens, EkAppendParams)
    EK_KERNEL(ek_prefill_simt_f32, EkPrefillParams)
    EK_KERNEL(ek_prefill_simt_f16, EkPrefillParams)
    EK_KERNEL(ek_prefill_simt_bf16, EkPrefillParams)
    EK_KERNEL(ek_prefill_simt_f32_k16, EkPrefillParams)
    EK_KERNEL(ek_prefill_simt_f16_k16, EkPrefillParams)
    EK_KERNEL(ek_prefill_simt_bf16_k16, EkPrefillParams)
    EK_KERNEL(ek_prefill_mma_f16_d64_m64, EkPrefillParams)
    EK_KERNEL(ek_prefill_mma_f16_d64_m128, EkPrefillParams)
    EK_KERNEL(ek_prefill_mma_f16_d128_m64, EkPrefillParams)
    EK_KERNEL(ek_prefill_mma_f16_d128_m128, EkPrefillParams)
    EK_KERNEL(ek_prefill_mma_bf16_d64_m64, EkPrefillParams)
    EK_KERNEL(ek_prefill_mma_bf16_d64_m128, EkPrefillParams)
    EK_KERNEL(ek_prefill_mma_bf16_d128_m64, EkPrefillParams)
    EK_KERNEL(ek_prefill_mma_bf16_d128_m128, EkPrefillParams)
    EK_KERNEL(ek_plan_reps_q_f32, EkPlanParams)
    EK_KERNEL(ek_plan_reps_q_f16, EkPlanParams)
    EK_KERNEL(ek_plan_reps_q_bf16, EkPlanParams)
    EK_KERNEL(ek_plan_reps_k_f32, EkPlanParams)
    EK_KERNEL(ek_plan_reps_k_f16, EkPlanParams)
    EK_KERNEL(ek_plan_reps_k_bf16, EkPlanParams)
    EK_KERNEL(ek_plan_logits, EkPlanParams)
    EK_KERNEL(ek_plan_logits_f32, EkPlanParams)
    EK_KERNEL(ek_plan_softmax, EkPlanParams)
    EK_KERNEL(ek_plan_decide, EkPlanParams)
    EK_KERNEL(ek_plan_rank, EkPlanParams)
    EK_KERNEL(ek_numerics_probe, EkProbeParams)
    EK_KERNEL(ek_compress_stats_f32, EkCompressParams)
    EK_KERNEL(ek_compress_stats_f16, EkCompressParams)
    EK_KERNEL(ek_compress_stats_bf16, EkCompressParams)
    EK_KERNEL(ek_compress_means_f32, EkCompressParams)
    EK_KERNEL(ek_compress_means_f16, EkCompressParams)
    EK_KERNEL(ek_compress_means_bf16, EkCompressParams)
    EK_KERNEL(ek_compress_stats_mma_f16_d64, EkCompressParams)
    EK_KERNEL(ek_compress_stats_mma_f16_d128, EkCompressParams)
    EK_KERNEL(ek_compress_stats_mma_bf16_d64, EkCompressParams)
    EK_KERNEL(ek_compress_stats_mma_bf16_d128, EkCompressParams)
    EK_KERNEL(ek_compress_means_mma_f16_d64, EkCompressParams)
    EK_KERNEL(ek_compress_means_mma_f16_d128, EkCompressParams)
    EK_KERNEL(ek_compress_means_mma_bf16_d64, EkCompressParams)
    EK_KERNEL(ek_compress_means_mma_bf16_d128, EkCompressParams)
    EK_KERNEL(ek_compress_pool, EkCompressParams)
    EK_KERNEL(ek_compress_topk, EkCompressParams)
    EK_KERNEL(ek_compress_adakv_mask, EkCompressParams)
    EK_KERNEL(ek_compress_adakv_extra, EkCompressParams)
    EK_KERNEL(ek_compress_adakv_merge, EkCompressParams)
    EK_KERNEL(ek_compress_gather_f32, EkCompressParams)
    EK_KERNEL(ek_compress_gather_f16, EkCompressParams)
    EK_KERNEL(ek_compress_gather_bf16, EkCompressParams)
    EK_KERNEL(ek_compress_compact_f32, EkCompressParams)
    EK_KERNEL(ek_compress_compact_f16, EkCompressParams)
    EK_KERNEL(ek_compress_compact_bf16, EkCompressParams)
    EK_KERNEL(ek_compress_compact_v16, EkCompressParams)
};
#undef EK_KERNEL
constexpr size_t KERNEL_COUNT = sizeof(kernels) / sizeof(kernels[0]);

// A kernel as loaded on one device: its attributes there and its settable dynamic-memory limit.
struct Function {
    const Kernel* kernel = nullptr;
    const Device* device = nullptr;
    int max_threads = 0, static_smem = 0, registers = 0;
    int max_dynamic = SHARED_PER_BLOCK;
};

std::mutex lock;
// Launches share it; the planted out-of-bounds write holds it alone until its guard is restored,
// so concurrent launches never see that guard broken.
std::shared_mutex launching;
thread_local std::string last_error;
std::atomic<unsigned long long> launches{0};
// A multiprocessor count that overrides every device's (0: each device's own).
std::atomic<int> multiprocessors{0};

CUresult fail(CUresult code, const std::string& what) {
    last_error = what;
    std::fprintf(stderr, "[cuda-emu] %s\n", what.c_str());
    return code;
}

// A driver call this thread has asked to fail once (ek_cuda_emu_fail_next): a device that is
// present but broken, for the tests of what `auto` does then.
thread_local std::string fail_next;
bool planted_failure(const char* call) {
    if (fail_next != call) return false;
    fail_next.clear();
    return true;
}

// ---------------------------------------------------------------------------------------------
// Contexts (one primary context per device) and modules.

struct Context {
    int device;
};
Context contexts[DEVICE_COUNT] = {{0}, {1}, {2}, {3}};
thread_local Context* current = nullptr;
const Device& current_device() { return DEVICES[current ? current->device : 0]; }

struct Module {
    const Device* device;
    Function functions[KERNEL_COUNT];
};

// Whether compiled code for `sm` (e.g. 86) runs on compute capability `cc`: same major, no newer
// minor (CUDA C++ Programming Guide, "Binary Compatibility").
bool sass_runs_on(int sm, int cc) { return sm / 10 == cc / 10 && sm % 10 <= cc % 10; }

// Whether a module image carries code `device` can run: a cubin (ELF, e_machine EM_CUDA = 190:
// the SM in e_flags bits 8..15 from ELF ABI version 8, bits 0..7 before), a fatbin (magic
// 0xBA55ED50: entries of kind 1 = PTX, 2 = ELF, each naming its SM) or PTX text (`.version`,
// `.target sm_XX`; a driver JITs PTX for its own or an older target of an ISA it knows).
CUresult check_image(const unsigned char* image, const Device& dev, std::string& why) {
    const auto u16 = [&](size_t o) { uint16_t v; std::memcpy(&v, image + o, 2); return v; };
    const auto u32 = [&](size_t o) { uint32_t v; std::memcpy(&v, image + o, 4); return v; };
    const auto u64 = [&](size_t o) { uint64_t v; std::memcpy(&v, image + o, 8); return v; };
    const std::string target = "sm_" + std::to_string(dev.cc);
    if (std::memcmp(image, "\x7f" "ELF", 4) == 0) {
        if (u16(18) != 190) return why = "not a CUDA ELF image", INVALID_IMAGE;
        const uint32_t flags = u32(48);
        const int sm = image[8] >= 8 ? (flags >> 8) & 0xff : flags & 0xff;
        if (sass_runs_on(sm, dev.cc)) return SUCCESS;
        why = "a cubin for sm_" + std::to_string(sm) + " cannot run on " + target;
        return NO_BINARY_FOR_GPU;
    }
    if (u32(0) == 0xBA55ED50u) {
        const uint64_t size = u64(8);
        std::string seen;
        for (uint64_t o = u16(6); o + 32 <= u16(6) + size;) {
            const uint16_t kind = u16(o);
            const uint32_t header = u32(o + 4), sm = u32(o + 28);
            const uint64_t payload = u64(o + 8);
            if ((kind == 2 && sass_runs_on((int)sm, dev.cc)) || (kind == 1 && (int)sm <= dev.cc)) return SUCCESS;
            seen += std::string(seen.empty() ? "" : ", ") + (kind == 1 ? "compute_" : "sm_") + std::to_string(sm);
            o += header + payload;
        }
        why = "the fatbin holds " + seen + ", none of which runs on " + target;
        return NO_BINARY_FOR_GPU;
    }
    // PTX text: ".version MAJOR.MINOR" and ".target sm_XX".
    const char* text = reinterpret_cast<const char*>(image);
    const char* version = std::strstr(text, ".version ");
    const char* tgt = std::strstr(text, ".target sm_");
    if (!version || !tgt) return why = "neither a cubin, a fatbin nor PTX", INVALID_IMAGE;
    const char* v = version + std::strlen(".version ");
    const char* dot = std::strchr(v, '.');
    const int isa = std::atoi(v) * 10 + (dot ? std::atoi(dot + 1) : 0);
    const int sm = std::atoi(tgt + std::strlen(".target sm_"));
    if (isa > PTX_ISA_MAX) {
        why = "PTX ISA " + std::to_string(isa / 10) + "." + std::to_string(isa % 10) + " is newer than this driver's 9.0";
        return UNSUPPORTED_PTX_VERSION;
    }
    if (sm > dev.cc) return why = "PTX for sm_" + std::to_string(sm) + " cannot be compiled for " + target, NO_BINARY_FOR_GPU;
    return SUCCESS;
}

}  // namespace

namespace {

// ---------------------------------------------------------------------------------------------
// Memory.

// An allocation of n bytes: whole pages holding the head guard and the user bytes rounded up to
// ALIGN (`padded`), the user bytes ending `accessible` bytes in, then one inaccessible page.
struct Layout {
    size_t padded, accessible, total;
};
size_t page_bytes() {
    static const size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}
Layout layout_of(size_t n) {
    const size_t padded = (n + ALIGN - 1) / ALIGN * ALIGN, page = page_bytes();
    const size_t accessible = (GUARD + padded + page - 1) / page * page;
    return {padded, accessible, accessible + page};
}
// The start of the mapping holding user address p.
unsigned char* base_of(CUdeviceptr p, const Layout& l) {
    return reinterpret_cast<unsigned char*>(p) + l.padded - l.accessible;
}

bool guards_intact(CUdeviceptr p, size_t n) {
    const Layout l = layout_of(n);
    const unsigned char *base = base_of(p, l), *user = reinterpret_cast<const unsigned char*>(p);
    for (const unsigned char* b = base; b < user; b++)
        if (*b != GUARD_BYTE) return false;
    for (const unsigned char* b = user + n; b < base + l.accessible; b++)
        if (*b != GUARD_BYTE) return false;
    return true;
}

// One stream operation that touched an allocation: its stream, its place in that stream, what it was.
struct Touch {
    int stream = -1;
    unsigned long long seq = 0;
    std::string what;
};
struct Allocation {
    size_t size;
    Touch last_write;
    std::map<int, Touch> reads;  // per stream, the latest read since the last write
};
std::map<CUdeviceptr, Allocation> allocations;  // user address → allocation (under `lock`)

// The allocation holding [p, p + n), or null (under `lock`).
Allocation* allocation_at(CUdeviceptr p, size_t n, CUdeviceptr* base = nullptr) {
    auto it = allocations.upper_bound(p);
    if (it == allocations.begin()) return nullptr;
    --it;
    if (p < it->first || p + n > it->first + it->second.size) return nullptr;
    if (base) *base = it->first;
    return &it->second;
}
bool inside(CUdeviceptr p, size_t n) {
    std::lock_guard<std::mutex> g(lock);
    return allocation_at(p, n) != nullptr;
}

// The kernel this thread is running (for the fault report), and where the report goes.
thread_local const char* running_kernel = nullptr;
int report_fd = 2;
struct sigaction previous_segv;

// A fault inside an emulated kernel: report it and end the process (async-signal-safe calls
// only, plus snprintf of integers and strings). Any other fault goes to the previous handler.
void on_fault(int sig, siginfo_t* info, void* uctx) {
    if (!running_kernel) {
        sigaction(SIGSEGV, &previous_segv, nullptr);
        return;  // the faulting instruction runs again under the previous handler
    }
    char text[512];
    const int len = std::snprintf(text, sizeof text,
                                  "[cuda-emu] %s: block (%u,%u,%u) thread %u accessed %p, outside any allocation "
                                  "(past an allocation's end, or not device memory): CUDA_ERROR_ILLEGAL_ADDRESS\n",
                                  running_kernel, blockIdx.x, blockIdx.y, blockIdx.z,
                                  (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x, info->si_addr);
    if (len > 0) (void)!write(report_fd, text, (size_t)len < sizeof text ? (size_t)len : sizeof text - 1);
    _exit(134);
}
void install_fault_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa {};
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &previous_segv);
    });
}

// ---------------------------------------------------------------------------------------------
// Stream order as vector clocks: clock[s] of a stream (event, host thread) is the last operation
// of stream s known to come before it. An operation on stream t ordered after operation n of
// stream s needs clock_t[s] ≥ n.

using Clock = std::vector<unsigned long long>;
void join(Clock& into, const Clock& from) {
    if (into.size() < from.size()) into.resize(from.size(), 0);
    for (size_t i = 0; i < from.size(); i++) into[i] = std::max(into[i], from[i]);
}
unsigned long long at(const Clock& c, int s) { return (size_t)s < c.size() ? c[s] : 0; }

struct Stream {
    int id;
    Clock clock;
    unsigned long long seq = 0;
};
std::map<CUstream, Stream> streams;  // the null stream (legacy default) is streams[nullptr]
std::map<CUevent, Clock> events;
int next_stream = 0;
// What each host thread has seen complete (stream and event synchronisations, blocking copies):
// operations it enqueues afterwards come after those.
thread_local Clock host;

Stream& stream_of(CUstream s) {
    auto it = streams.find(s);
    if (it == streams.end()) it = streams.emplace(s, Stream{next_stream++, {}, 0}).first;
    return it->second;
}

// A buffer an operation touches.
struct Use {
    CUdeviceptr p;
    size_t n;
    bool write;
};

// Enqueues an operation on stream s touching `uses`: "" if it is ordered after every earlier
// conflicting use by another stream, else the race (and then the operation must not run).
std::string enqueue(CUstream s, const std::string& what, const std::vector<Use>& uses) {
    std::lock_guard<std::mutex> g(lock);
    Stream& st = stream_of(s);
    join(st.clock, host);
    const unsigned long long seq = st.seq + 1;
    const auto unordered = [&](const Touch& t) { return t.stream >= 0 && t.stream != st.id && at(st.clock, t.stream) < t.seq; };
    const auto race = [&](const Touch& t, CUdeviceptr base, const char* how) {
        return "stream race: " + what + " on stream " + std::to_string(st.id) + " " + how + " allocation " +
               std::to_string(base) + ", which " + t.what + " on stream " + std::to_string(t.stream) +
               " also uses, with no event wait or synchronisation ordering the two";
    };
    for (const Use& u : uses) {
        CUdeviceptr base = 0;
        const Allocation* a = allocation_at(u.p, std::max<size_t>(u.n, 1), &base);
        if (!a) continue;
        if (unordered(a->last_write)) return race(a->last_write, base, u.write ? "writes" : "reads");
        if (u.write)
            for (const auto& [_, r] : a->reads)
                if (unordered(r)) return race(r, base, "writes");
    }
    st.seq = seq;
    if (st.clock.size() <= (size_t)st.id) st.clock.resize(st.id + 1, 0);
    st.clock[st.id] = seq;
    for (const Use& u : uses) {
        Allocation* a = allocation_at(u.p, std::max<size_t>(u.n, 1));
        if (!a) continue;
        const Touch t{st.id, seq, what};
        if (u.write) {
            a->last_write = t;
            a->reads.clear();
        } else {
            a->reads[st.id] = t;
        }
    }
    return "";
}

// The host has seen stream s (or everything) complete.
void host_waits_for(CUstream s) {
    std::lock_guard<std::mutex> g(lock);
    join(host, stream_of(s).clock);
}
void host_waits_for_all() {
    std::lock_guard<std::mutex> g(lock);
    for (auto& [_, st] : streams) join(host, st.clock);
}

CUresult raced(const std::string& race) { return fail(ILLEGAL_STATE, race); }

// ---------------------------------------------------------------------------------------------
// Stream capture (CUDA graphs), as the CUDA Programming Guide's "Stream Capture" and the
// cuStreamBeginCapture / cuThreadExchangeStreamCaptureMode docs describe it: work enqueued on a
// capturing stream is recorded, not run (here: kernel launches; other stream work on a capturing
// stream — legal on hardware as memory nodes — is not emulated and fails); while a capture in
// global mode is under way (thread-local mode: on its thread), the calls that are not
// stream-ordered — synchronous allocation, free, copies and memset, event queries — fail with
// CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and invalidate the capture, and so does a context
// synchronisation in any mode; a capturing stream cannot be synchronised; waiting on an event
// recorded outside the capture needs CU_EVENT_WAIT_EXTERNAL (else CUDA_ERROR_STREAM_CAPTURE_
// ISOLATION); an event last recorded in a capture cannot be synchronised or queried
// (CUDA_ERROR_CAPTURED_EVENT); after an invalidation, work on the stream fails
// (CUDA_ERROR_STREAM_CAPTURE_INVALIDATED) until the capture is ended. An instantiated graph
// replays its launches in order on the stream it is launched on, reading the device memory of
// the moment. Not emulated: cross-stream capture (fork/join), external event nodes, the
// wrong-thread check at the end of a capture.
constexpr int CAPTURE_MODE_GLOBAL = 0, CAPTURE_MODE_THREAD_LOCAL = 1;
constexpr unsigned EVENT_WAIT_EXTERNAL = 1;
struct Node {
    const Function* f;
    unsigned grid[3], block[3], shared;
    std::vector<unsigned char> params;  // the params struct, by value
};
struct Graph {
    std::vector<Node> nodes;
};
struct Capture {
    Graph* graph;
    int mode;
    std::thread::id thread;
    std::string invalid;  // why the capture was invalidated ("" while valid)
};
std::map<CUstream, Capture> captures;
std::set<CUevent> captured_events;

// The call `call` is not stream-ordered: refused (and every capture it could break invalidated)
// while a global capture, or a thread-local one of this thread, is under way.
CUresult unsafe_during_capture(const char* call) {
    std::lock_guard<std::mutex> g(lock);
    bool refused = false;
    for (auto& [_, c] : captures)
        if (c.mode == CAPTURE_MODE_GLOBAL || (c.mode == CAPTURE_MODE_THREAD_LOCAL && c.thread == std::this_thread::get_id())) {
            refused = true;
            if (c.invalid.empty()) c.invalid = std::string(call) + " during the capture";
        }
    if (!refused) return SUCCESS;
    return fail(STREAM_CAPTURE_UNSUPPORTED, std::string(call) + " while a stream is capturing (not stream-ordered: "
                                            "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED; the capture is invalidated)");
}

// Work on a stream whose capture was invalidated fails until the capture is ended (Programming
// Guide, "Invalidation"). Called with `lock` held.
CUresult invalidated(const Capture& c, const char* call) {
    return fail(STREAM_CAPTURE_INVALIDATED, std::string(call) + " on a stream whose capture was invalidated by " + c.invalid);
}

// Stream work other than kernel launches on a capturing stream: not emulated, refused.
CUresult uncaptured_work(CUstream s, const char* call) {
    std::lock_guard<std::mutex> g(lock);
    auto it = captures.find(s);
    if (it == captures.end()) return SUCCESS;
    if (it->second.invalid.empty()) it->second.invalid = std::string(call) + " on the capturing stream";
    return fail(STREAM_CAPTURE_UNSUPPORTED,
                std::string(call) + " on a capturing stream: the emulated capture records kernel launches only");
}

}  // namespace

// Marker: lets the crate tell the emulator from a real driver. Launches so far: of kernel `name`,
// or of all kernels when `name` is null (-1: no such kernel).
EXPORT long long ek_cuda_emu_launches(const char* name) {
    if (!name) return (long long)launches;
    for (auto& k : kernels)
        if (std::strcmp(k.name, name) == 0) return k.launches;
    return -1;
}

// cp.async copies land at issue (1) or when waited for (0, the default).
EXPORT void ek_cuda_emu_cp_async_early(int early) { ekemu::cp_async_early = early != 0; }

// The work counters so far: mma.sync (m16n8k16, per warp), ldmatrix (per warp), cp.async bytes,
// block barriers, bytes loaded by load_f32, allocations (cuMemAlloc, cuMemAllocAsync), host-to-
// device copies.
EXPORT void ek_cuda_emu_counters(unsigned long long* out) {
    out[0] = ekemu::counters.mma, out[1] = ekemu::counters.ldmatrix;
    out[2] = ekemu::counters.cp_async_bytes, out[3] = ekemu::counters.barriers;
    out[4] = ekemu::counters.ld_global_bytes;
    out[5] = ekemu::counters.allocations, out[6] = ekemu::counters.htod_copies;
}

// The order fibers are resumed in (ekemu::schedule).
EXPORT void ek_cuda_emu_schedule(unsigned order) { ekemu::schedule = order; }

// The multiprocessor count every device reports to backends opened from now on (0: their own).
EXPORT void ek_cuda_emu_set_multiprocessors(int n) { multiprocessors = n > 0 ? n : 0; }

EXPORT CUresult cuModuleLoadData(CUmodule* m, const void* image);
EXPORT CUresult cuModuleUnload(CUmodule m);

// The emulated devices: device d's compute capability (e.g. 86), -1 past the last.
EXPORT int ek_cuda_emu_device_cc(int d) { return d >= 0 && d < DEVICE_COUNT ? DEVICES[d].cc : -1; }

// The next call named `call` (today: "cuModuleLoadData") made by this thread fails.
EXPORT void ek_cuda_emu_fail_next(const char* call) { fail_next = call ? call : ""; }

// Loads `image` on device d as cuModuleLoadData would (and unloads it): the CUresult, and the
// reason in `msg`.
EXPORT CUresult ek_cuda_emu_load_image(int d, const void* image, char* msg, int len) {
    if (d < 0 || d >= DEVICE_COUNT) return INVALID_DEVICE;
    Context* saved = current;
    current = &contexts[d];
    last_error.clear();
    CUmodule m = nullptr;
    const CUresult r = cuModuleLoadData(&m, image);
    if (m) cuModuleUnload(m);
    current = saved;
    std::snprintf(msg, len, "%s", last_error.c_str());
    return r;
}

EXPORT CUresult cuInit(unsigned) { return SUCCESS; }
EXPORT CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return SUCCESS;
}
EXPORT CUresult cuDeviceGetCount(int* n) {
    *n = DEVICE_COUNT;
    return SUCCESS;
}
EXPORT CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal < 0 || ordinal >= DEVICE_COUNT) return INVALID_DEVICE;
    *d = ordinal;
    return SUCCESS;
}
EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (d < 0 || d >= DEVICE_COUNT) return INVALID_DEVICE;
    std::snprintf(name, len, "%s", DEVICES[d].name);
    return SUCCESS;
}
EXPORT CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = 80ull << 30;
    return SUCCESS;
}
EXPORT CUresult cuMemGetInfo_v2(size_t* free, size_t* total) {
    *free = *total = 80ull << 30;
    return SUCCESS;
}
EXPORT CUresult cuDeviceGetAttribute(int* v, int attribute, CUdevice d) {
    if (d < 0 || d >= DEVICE_COUNT) return INVALID_DEVICE;
    const Device& dev = DEVICES[d];
    switch (attribute) {
        case 1: *v = 1024; break;                      // max threads per block
        case 8: *v = SHARED_PER_BLOCK; break;          // shared memory per block
        case 10: *v = 32; break;                       // warp size
        case 12: *v = REGISTERS_PER_SM; break;         // registers per block
        case 16: *v = multiprocessors ? multiprocessors.load() : dev.sms; break;
        case 39: *v = dev.threads_per_sm; break;       // max threads per multiprocessor
        case 75: *v = dev.cc / 10; break;              // compute capability
        case 76: *v = dev.cc % 10; break;
        case 81: *v = dev.per_sm; break;               // shared memory per multiprocessor
        case 82: *v = REGISTERS_PER_SM; break;         // registers per multiprocessor
        case 97: *v = dev.optin; break;                // opt-in shared memory per block
        case 115: *v = 1; break;                       // memory pools: cuMemAllocAsync
        default: *v = 0;
    }
    return SUCCESS;
}
EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) {
    if (d < 0 || d >= DEVICE_COUNT) return INVALID_DEVICE;
    *c = &contexts[d];
    return SUCCESS;
}
EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return SUCCESS; }
EXPORT CUresult cuCtxSetCurrent(CUcontext c) {
    current = static_cast<Context*>(c);
    return SUCCESS;
}
EXPORT CUresult cuCtxGetCurrent(CUcontext* c) {
    *c = current;
    return SUCCESS;
}
EXPORT CUresult cuCtxGetDevice(CUdevice* d) {
    *d = current ? current->device : 0;
    return SUCCESS;
}
EXPORT CUresult cuCtxSynchronize() {
    {
        // Synchronising a context while any of its streams captures is invalid in every mode.
        std::lock_guard<std::mutex> g(lock);
        for (auto& [_, c] : captures) {
            if (c.invalid.empty()) c.invalid = "cuCtxSynchronize during the capture";
            return fail(STREAM_CAPTURE_UNSUPPORTED, "cuCtxSynchronize while a stream of the context is capturing");
        }
    }
    host_waits_for_all();
    return SUCCESS;
}
EXPORT CUresult cuCtxSetFlags(unsigned) { return SUCCESS; }

EXPORT CUresult cuStreamCreate(CUstream* s, unsigned) {
    *s = new int(0);
    std::lock_guard<std::mutex> g(lock);
    stream_of(*s);
    return SUCCESS;
}
EXPORT CUresult cuStreamDestroy_v2(CUstream s) {
    {
        std::lock_guard<std::mutex> g(lock);
        streams.erase(s);
        if (auto c = captures.find(s); c != captures.end()) {  // destroyed mid-capture: the capture ends with it
            delete c->second.graph;
            captures.erase(c);
        }
    }
    delete static_cast<int*>(s);
    return SUCCESS;
}
EXPORT CUresult cuStreamSynchronize(CUstream s) {
    {
        std::lock_guard<std::mutex> g(lock);
        auto c = captures.find(s);
        if (c != captures.end()) {
            if (c->second.invalid.empty()) c->second.invalid = "cuStreamSynchronize of the capturing stream";
            return fail(STREAM_CAPTURE_UNSUPPORTED, "cuStreamSynchronize of a capturing stream");
        }
    }
    host_waits_for(s);
    return SUCCESS;
}
EXPORT CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned flags) {
    std::lock_guard<std::mutex> g(lock);
    auto it = events.find(e);
    if (it == events.end()) return fail(INVALID_HANDLE, "cuStreamWaitEvent on an unknown event");
    const bool in_capture = captured_events.count(e) > 0;
    auto c = captures.find(s);
    if (c != captures.end()) {
        if (!c->second.invalid.empty()) return invalidated(c->second, "cuStreamWaitEvent");
        if (in_capture) return SUCCESS;  // recorded earlier in this (single-stream) capture: already ordered
        if (flags & EVENT_WAIT_EXTERNAL) return SUCCESS;
        if (c->second.invalid.empty()) c->second.invalid = "a wait on an event recorded outside the capture";
        return fail(STREAM_CAPTURE_ISOLATION,
                    "cuStreamWaitEvent: a capturing stream waits on an event recorded outside the capture without "
                    "CU_EVENT_WAIT_EXTERNAL (CUDA_ERROR_STREAM_CAPTURE_ISOLATION; cudarc's event tracking does this "
                    "on any stream but the legacy one, which cannot capture: disable event tracking to capture)");
    }
    if (in_capture)
        return fail(STREAM_CAPTURE_UNSUPPORTED, "cuStreamWaitEvent on an event recorded in a capture: cross-stream "
                                                "capture is not emulated");
    join(stream_of(s).clock, it->second);
    return SUCCESS;
}
EXPORT CUresult cuEventCreate(CUevent* e, unsigned) {
    *e = new int(0);
    std::lock_guard<std::mutex> g(lock);
    events[*e] = Clock{};
    return SUCCESS;
}
EXPORT CUresult cuEventDestroy_v2(CUevent e) {
    {
        std::lock_guard<std::mutex> g(lock);
        events.erase(e);
        captured_events.erase(e);  // a recycled handle starts fresh
    }
    delete static_cast<int*>(e);
    return SUCCESS;
}
// The event captures what its stream has enqueued so far (and what that stream waited for).
EXPORT CUresult cuEventRecord(CUevent e, CUstream s) {
    std::lock_guard<std::mutex> g(lock);
    auto it = events.find(e);
    if (it == events.end()) return fail(INVALID_HANDLE, "cuEventRecord of an unknown event");
    if (auto c = captures.find(s); c != captures.end()) {
        if (!c->second.invalid.empty()) return invalidated(c->second, "cuEventRecord");
        captured_events.insert(e);  // a node of the capture, not a point in the stream's history
        return SUCCESS;
    }
    captured_events.erase(e);
    Stream& st = stream_of(s);
    join(st.clock, host);
    it->second = st.clock;
    return SUCCESS;
}
EXPORT CUresult cuEventSynchronize(CUevent e) {
    std::lock_guard<std::mutex> g(lock);
    auto it = events.find(e);
    if (it == events.end()) return fail(INVALID_HANDLE, "cuEventSynchronize of an unknown event");
    if (captured_events.count(e))
        return fail(CAPTURED_EVENT, "cuEventSynchronize/cuEventQuery of an event last recorded in a capturing stream");
    join(host, it->second);
    return SUCCESS;
}
EXPORT CUresult cuEventQuery(CUevent e) {
    // Refused from any thread during a global capture (as an H100 does).
    if (CUresult r = unsafe_during_capture("cuEventQuery")) return r;
    return cuEventSynchronize(e);
}

namespace {
CUresult allocate(CUdeviceptr* p, size_t n) {
    install_fault_handler();
    ekemu::counters.allocations++;
    const Layout l = layout_of(n);
    void* map = mmap(nullptr, l.total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) return OUT_OF_MEMORY;
    auto* b = static_cast<unsigned char*>(map);
    if (mprotect(b + l.accessible, l.total - l.accessible, PROT_NONE) != 0) {
        munmap(map, l.total);
        return OUT_OF_MEMORY;
    }
    unsigned char* user = b + l.accessible - l.padded;
    std::memset(b, GUARD_BYTE, l.accessible);
    std::memset(user, POISON_BYTE, n);
    *p = reinterpret_cast<CUdeviceptr>(user);
    std::lock_guard<std::mutex> g(lock);
    allocations[*p] = Allocation{n, {}, {}};
    return SUCCESS;
}
CUresult release(CUdeviceptr p) {
    size_t n;
    {
        std::lock_guard<std::mutex> g(lock);
        auto it = allocations.find(p);
        if (it == allocations.end()) return fail(INVALID_VALUE, "cuMemFree of an address cuMemAlloc did not return");
        n = it->second.size;
        allocations.erase(it);
    }
    const bool ok = guards_intact(p, n);
    const Layout l = layout_of(n);
    munmap(base_of(p, l), l.total);
    return ok ? SUCCESS : fail(ILLEGAL_ADDRESS, "an allocation's guard bytes were overwritten before cuMemFree");
}
}  // namespace

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    if (CUresult r = unsafe_during_capture("cuMemAlloc")) return r;
    return allocate(p, n);
}
// Stream-ordered: the allocation is the stream's until an event or synchronisation orders others after.
EXPORT CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, CUstream s) {
    if (CUresult r = uncaptured_work(s, "cuMemAllocAsync")) return r;
    if (CUresult r = allocate(p, n)) return r;
    const std::string race = enqueue(s, "cuMemAllocAsync", {{*p, n, true}});
    return race.empty() ? SUCCESS : raced(race);
}
// cuMemFree waits for the device (every stream) first.
EXPORT CUresult cuMemFree_v2(CUdeviceptr p) {
    if (CUresult r = unsafe_during_capture("cuMemFree")) return r;
    host_waits_for_all();
    return release(p);
}
EXPORT CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    if (CUresult r = uncaptured_work(s, "cuMemFreeAsync")) return r;
    const std::string race = enqueue(s, "cuMemFreeAsync", {{p, 1, true}});
    if (!race.empty()) return raced(race);
    return release(p);
}

EXPORT CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, CUstream s) {
    if (!inside(p, n)) return fail(INVALID_VALUE, "cuMemsetD8 outside an allocation");
    if (CUresult r = uncaptured_work(s, "cuMemsetD8Async")) return r;
    const std::string race = enqueue(s, "cuMemsetD8Async", {{p, n, true}});
    if (!race.empty()) return raced(race);
    std::memset(reinterpret_cast<void*>(p), v, n);
    return SUCCESS;
}
EXPORT CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) {
    if (CUresult r = unsafe_during_capture("cuMemsetD8")) return r;
    const CUresult r = cuMemsetD8Async(p, v, n, nullptr);
    host_waits_for(nullptr);
    return r;
}
// From pageable host memory: the data is staged at the call, the device write is in stream order.
EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    if (!inside(dst, n)) return fail(INVALID_VALUE, "cuMemcpyHtoD outside an allocation");
    if (CUresult r = uncaptured_work(s, "cuMemcpyHtoDAsync")) return r;
    ekemu::counters.htod_copies++;
    const std::string race = enqueue(s, "cuMemcpyHtoDAsync", {{dst, n, true}});
    if (!race.empty()) return raced(race);
    std::memcpy(reinterpret_cast<void*>(dst), src, n);
    return SUCCESS;
}
EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    if (CUresult r = unsafe_during_capture("cuMemcpyHtoD")) return r;
    const CUresult r = cuMemcpyHtoDAsync_v2(dst, src, n, nullptr);
    host_waits_for(nullptr);
    return r;
}
// To pageable host memory: returns once the copy (and so its stream up to it) is done.
EXPORT CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    if (!inside(src, n)) return fail(INVALID_VALUE, "cuMemcpyDtoH outside an allocation");
    if (CUresult r = uncaptured_work(s, "cuMemcpyDtoHAsync")) return r;
    const std::string race = enqueue(s, "cuMemcpyDtoHAsync", {{src, n, false}});
    if (!race.empty()) return raced(race);
    std::memcpy(dst, reinterpret_cast<const void*>(src), n);
    host_waits_for(s);
    return SUCCESS;
}
EXPORT CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    if (CUresult r = unsafe_during_capture("cuMemcpyDtoH")) return r;
    return cuMemcpyDtoHAsync_v2(dst, src, n, nullptr);
}
EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    if (!inside(dst, n) || !inside(src, n)) return fail(INVALID_VALUE, "cuMemcpyDtoD outside an allocation");
    if (CUresult r = uncaptured_work(s, "cuMemcpyDtoDAsync")) return r;
    const std::string race = enqueue(s, "cuMemcpyDtoDAsync", {{src, n, false}, {dst, n, true}});
    if (!race.empty()) return raced(race);
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return SUCCESS;
}
EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    if (CUresult r = unsafe_during_capture("cuMemcpyDtoD")) return r;
    const CUresult r = cuMemcpyDtoDAsync_v2(dst, src, n, nullptr);
    host_waits_for(nullptr);
    return r;
}

EXPORT CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    if (!image) return INVALID_VALUE;
    if (planted_failure("cuModuleLoadData")) return fail(INVALID_IMAGE, "cuModuleLoadData: planted failure (ek_cuda_emu_fail_next)");
    const Device& dev = current_device();
    std::string why;
    if (const CUresult r = check_image(static_cast<const unsigned char*>(image), dev, why))
        return fail(r, std::string("cuModuleLoadData on ") + dev.name + ": " + why);
    auto* mod = new Module{&dev, {}};
    for (size_t i = 0; i < KERNEL_COUNT; i++) {
        Function& f = mod->functions[i];
        f.kernel = &kernels[i];
        f.device = &dev;
        if (const KernelAttrs* a = attrs_of(kernels[i].name)) {
            f.max_threads = a->max_threads;
            f.static_smem = a->static_smem[dev.column];
            f.registers = a->registers[dev.column];
            f.max_dynamic = SHARED_PER_BLOCK - f.static_smem;
        }
    }
    *m = mod;
    return SUCCESS;
}
EXPORT CUresult cuModuleUnload(CUmodule m) {
    delete static_cast<Module*>(m);
    return SUCCESS;
}
EXPORT CUresult cuModuleGetFunction(void** f, CUmodule m, const char* name) {
    auto* mod = static_cast<Module*>(m);
    for (Function& fn : mod->functions)
        if (std::strcmp(fn.kernel->name, name) == 0) {
            if (!fn.max_threads)
                return fail(NOT_FOUND, std::string(name) + " has no attributes in cuda/host/kernel_attrs.h (stale: "
                                                           "ENTROPY_KERNELS_BLESS=1 cargo test --features cuda --test cuda_compile)");
            *f = &fn;
            return SUCCESS;
        }
    return fail(NOT_FOUND, std::string("no kernel named ") + name + " in cuda/host/driver_emu.cpp's table");
}
// CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (8): at most the device's opt-in size less the
// function's static shared memory (CUDA Driver API, cuFuncSetAttribute).
EXPORT CUresult cuFuncSetAttribute(void* fp, int attribute, int value) {
    Function& f = *static_cast<Function*>(fp);
    if (attribute == 8) {
        const int limit = f.device->optin - f.static_smem;
        if (value < 0 || value > limit)
            return fail(INVALID_VALUE, std::string(f.kernel->name) + ": cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES, " +
                                           std::to_string(value) + ") above the opt-in " + std::to_string(f.device->optin) +
                                           " bytes less the kernel's " + std::to_string(f.static_smem) + " static bytes");
        f.max_dynamic = value;
    }
    return SUCCESS;
}
// What the driver reports: 0 max threads per block, 1 static shared bytes, 2 constant bytes,
// 3 local bytes, 4 registers, 5 PTX and 6 binary version, 8 the dynamic shared memory limit.
EXPORT CUresult cuFuncGetAttribute(int* v, int attribute, void* fp) {
    const Function& f = *static_cast<Function*>(fp);
    switch (attribute) {
        case 0: *v = f.max_threads; break;
        case 1: *v = f.static_smem; break;
        case 4: *v = f.registers; break;
        case 5:
        case 6: *v = f.device->cc; break;
        case 8: *v = f.max_dynamic; break;
        default: *v = 0;
    }
    return SUCCESS;
}

namespace {
// The checks cuLaunchKernel makes before anything runs.
CUresult check_launch(const Function& f, unsigned threads, unsigned shared) {
    const std::string k = f.kernel->name;
    if (threads == 0 || threads > 1024)
        return fail(INVALID_VALUE, k + ": a block of " + std::to_string(threads) + " threads (1..1024)");
    // Beyond the kernel's own bound the driver answers "too many resources requested for launch".
    if ((int)threads > f.max_threads)
        return fail(LAUNCH_OUT_OF_RESOURCES, k + ": a block of " + std::to_string(threads) +
                                                 " threads exceeds the kernel's launch bound (" +
                                                 std::to_string(f.max_threads) + " threads, .maxntid)");
    if ((int)shared > f.max_dynamic)
        return fail(INVALID_VALUE, k + ": " + std::to_string(shared) + " bytes of dynamic shared memory above the function's limit " +
                                       std::to_string(f.max_dynamic));
    if (f.static_smem + (int)shared > f.device->optin)
        return fail(INVALID_VALUE, k + ": " + std::to_string(f.static_smem) + " static + " + std::to_string(shared) +
                                       " dynamic bytes of shared memory exceed the device's " + std::to_string(f.device->optin));
    const unsigned warps = (threads + 31) / 32;
    const long long per_warp = ((long long)f.registers * 32 + REGISTER_UNIT - 1) / REGISTER_UNIT * REGISTER_UNIT;
    if (per_warp * warps > REGISTERS_PER_SM)
        return fail(LAUNCH_OUT_OF_RESOURCES, k + ": " + std::to_string(warps) + " warps of " + std::to_string(f.registers) +
                                                 " registers per thread exceed the SM's " + std::to_string(REGISTERS_PER_SM));
    return SUCCESS;
}

CUresult launch(const Function& f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                unsigned shared, CUstream stream, void** params, void** extra) {
    const Kernel& k = *f.kernel;
    if (extra) return fail(INVALID_VALUE, std::string(k.name) + ": `extra` launch arguments are not emulated");
    if (CUresult r = check_launch(f, bx * by * bz, shared)) return r;
    if (gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535)
        return fail(INVALID_VALUE, std::string(k.name) + ": grid outside the device limits");
    {
        std::lock_guard<std::mutex> g(lock);
        auto c = captures.find(stream);
        if (c != captures.end()) {
            if (!c->second.invalid.empty()) return invalidated(c->second, k.name);
            const auto* bytes = static_cast<const unsigned char*>(params[0]);
            c->second.graph->nodes.push_back(
                Node{&f, {gx, gy, gz}, {bx, by, bz}, shared, std::vector<unsigned char>(bytes, bytes + k.params_size)});
            return SUCCESS;
        }
    }
    // The buffers its params address, in stream order.
    std::vector<Use> uses;
    for (size_t i = 0; i < k.accesses; i++) {
        CUdeviceptr p;
        std::memcpy(&p, static_cast<const unsigned char*>(params[0]) + k.access[i].offset, sizeof p);
        if (p) uses.push_back({p, 1, k.access[i].write});
    }
    const std::string race = enqueue(stream, k.name, uses);
    if (!race.empty()) return raced(race);
    launches++;
    const_cast<Kernel&>(k).launches++;
    running_kernel = k.name;
    const std::string err =
        ekemu::launch(EkDim3{gx, gy, gz}, EkDim3{bx, by, bz}, shared, [&] { k.run(params); });
    running_kernel = nullptr;
    if (!err.empty()) return fail(LAUNCH_FAILED, std::string(k.name) + ": " + err);
    std::lock_guard<std::mutex> g(lock);
    for (auto& [p, a] : allocations)
        if (!guards_intact(p, a.size))
            return fail(ILLEGAL_ADDRESS, std::string(k.name) + " wrote outside an allocation (guard bytes changed)");
    return SUCCESS;
}
}  // namespace

EXPORT CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                               unsigned shared, CUstream s, void** params, void** extra) {
    std::shared_lock<std::shared_mutex> g(launching);
    return launch(*static_cast<Function*>(f), gx, gy, gz, bx, by, bz, shared, s, params, extra);
}

EXPORT CUresult cuStreamBeginCapture_v2(CUstream s, int mode) {
    std::lock_guard<std::mutex> g(lock);
    if (s == nullptr) return fail(INVALID_VALUE, "cuStreamBeginCapture on the legacy default stream");
    if (captures.count(s)) return fail(ILLEGAL_STATE, "cuStreamBeginCapture on a stream already capturing");
    captures[s] = Capture{new Graph, mode, std::this_thread::get_id(), ""};
    return SUCCESS;
}
EXPORT CUresult cuStreamEndCapture(CUstream s, CUgraph* graph) {
    std::lock_guard<std::mutex> g(lock);
    *graph = nullptr;
    auto c = captures.find(s);
    if (c == captures.end()) return fail(ILLEGAL_STATE, "cuStreamEndCapture on a stream that is not capturing");
    Capture cap = c->second;
    captures.erase(c);
    if (!cap.invalid.empty()) {
        delete cap.graph;
        return fail(STREAM_CAPTURE_INVALIDATED, "cuStreamEndCapture: the capture was invalidated by " + cap.invalid);
    }
    *graph = cap.graph;
    return SUCCESS;
}
// CUstreamCaptureStatus: 0 none, 1 active, 2 invalidated.
EXPORT CUresult cuStreamIsCapturing(CUstream s, int* status) {
    std::lock_guard<std::mutex> g(lock);
    auto c = captures.find(s);
    *status = c == captures.end() ? 0 : c->second.invalid.empty() ? 1 : 2;
    return SUCCESS;
}
EXPORT CUresult cuGraphInstantiateWithFlags(CUgraphExec* exec, CUgraph graph, unsigned long long) {
    if (!graph) return fail(INVALID_VALUE, "cuGraphInstantiate of a null graph");
    *exec = new Graph(*static_cast<Graph*>(graph));
    return SUCCESS;
}
EXPORT CUresult cuGraphUpload(CUgraphExec, CUstream) { return SUCCESS; }
EXPORT CUresult cuGraphLaunch(CUgraphExec exec, CUstream s) {
    if (CUresult r = uncaptured_work(s, "cuGraphLaunch")) return r;
    std::shared_lock<std::shared_mutex> g(launching);
    for (Node& n : static_cast<Graph*>(exec)->nodes) {
        void* params[] = {n.params.data()};
        const CUresult r = launch(*n.f, n.grid[0], n.grid[1], n.grid[2], n.block[0], n.block[1], n.block[2], n.shared, s,
                                  params, nullptr);
        if (r) return r;
    }
    return SUCCESS;
}
EXPORT CUresult cuGraphExecDestroy(CUgraphExec exec) {
    delete static_cast<Graph*>(exec);
    return SUCCESS;
}
EXPORT CUresult cuGraphDestroy(CUgraph graph) {
    delete static_cast<Graph*>(graph);
    return SUCCESS;
}

EXPORT CUresult cuGetErrorString(CUresult e, const char** s) {
    static thread_local std::string text;
    text = last_error.empty() ? "CUDA error " + std::to_string(e) + " (emulated driver)" : last_error;
    *s = text.c_str();
    return SUCCESS;
}
EXPORT CUresult cuGetErrorName(CUresult e, const char** s) {
    switch (e) {
        case SUCCESS: *s = "CUDA_SUCCESS"; break;
        case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case INVALID_IMAGE: *s = "CUDA_ERROR_INVALID_IMAGE"; break;
        case NO_BINARY_FOR_GPU: *s = "CUDA_ERROR_NO_BINARY_FOR_GPU"; break;
        case UNSUPPORTED_PTX_VERSION: *s = "CUDA_ERROR_UNSUPPORTED_PTX_VERSION"; break;
        case INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
        case INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case ILLEGAL_STATE: *s = "CUDA_ERROR_ILLEGAL_STATE"; break;
        case NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case ILLEGAL_ADDRESS: *s = "CUDA_ERROR_ILLEGAL_ADDRESS"; break;
        case LAUNCH_OUT_OF_RESOURCES: *s = "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"; break;
        case LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
        case STREAM_CAPTURE_UNSUPPORTED: *s = "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"; break;
        case STREAM_CAPTURE_INVALIDATED: *s = "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"; break;
        case STREAM_CAPTURE_ISOLATION: *s = "CUDA_ERROR_STREAM_CAPTURE_ISOLATION"; break;
        case CAPTURED_EVENT: *s = "CUDA_ERROR_CAPTURED_EVENT"; break;
        default: *s = "CUDA_ERROR_UNKNOWN";
    }
    return SUCCESS;
}

// ---------------------------------------------------------------------------------------------
// Planted violations (tests/cuda_emu.rs): kernel `code` breaks one rule; 0 breaks none.

namespace {
struct SelftestParams {
    int code;
    float* out;  // SELFTEST_THREADS + 1 floats: the end is 4 bytes short of the 16-byte grid
};
template <> struct Accesses<SelftestParams> {
    static constexpr Access list[] = {Access{offsetof(SelftestParams, out), true}};
};
constexpr unsigned SELFTEST_THREADS = 64;
constexpr size_t SELFTEST_BYTES = (SELFTEST_THREADS + 1) * sizeof(float);
// The selftest kernel's "compiled" attributes: its launch bound, 1 KiB of static shared memory,
// 32 registers (and a variant with 255, the most ptxas gives a thread).
constexpr int SELFTEST_STATIC = 1024;

void selftest_kernel(SelftestParams p) {
    const unsigned t = threadIdx.x, lane = t % 32;
    float v = (float)t;
    switch (p.code) {
        case 1:  // __syncthreads in divergent code
            if (t < 16) __syncthreads();
            break;
        case 2:  // a shuffle with a partial mask
            v = __shfl_xor_sync(0x0000ffffu, v, 1);
            break;
        case 3:  // lanes of one warp at different collectives
            if (lane < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
            else v = (float)__ballot_sync(0xffffffffu, 1);
            break;
        case 4:  // a lane exits before a shuffle
            if (lane == 0) return;
            v = __shfl_xor_sync(0xffffffffu, v, 1);
            break;
        case 5:  // a write past the end of the allocation, into its guard bytes
            if (t == 0) p.out[SELFTEST_THREADS + 1] = v;
            break;
        case 8:  // a read 64 bytes past the end of the allocation, into the inaccessible page
            v += p.out[SELFTEST_THREADS + 16];
            break;
        case 7: {  // a write past the launch's dynamic shared memory (none was asked for)
            EK_DYNAMIC_SHARED(float, smem);
            smem[t] = v;
            break;
        }
        default:  // every rule kept: a barrier, a shuffle, a ballot
            __syncthreads();
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += (float)__popc(__ballot_sync(0xffffffffu, t % 2));
    }
    p.out[t] = v;
}
Kernel selftest_entry{"selftest", [](void** a) { selftest_kernel(*static_cast<SelftestParams*>(a[0])); },
                      sizeof(SelftestParams), Accesses<SelftestParams>::list, 1, {}};
Function selftest_function(int registers, int max_threads) {
    Function f;
    f.kernel = &selftest_entry;
    f.device = &DEVICES[0];
    f.max_threads = max_threads;
    f.static_smem = SELFTEST_STATIC;
    f.registers = registers;
    f.max_dynamic = SHARED_PER_BLOCK - SELFTEST_STATIC;
    return f;
}

// Runs the selftest kernel in a child process, for violations that end the process that makes
// them (faults): ILLEGAL_ADDRESS with the child's report, or SUCCESS if it exits normally. Only
// the fork()ing thread exists in the child, so it takes none of the driver's locks.
CUresult run_in_child(SelftestParams p) {
    int fds[2];
    if (pipe(fds) != 0) return fail(INVALID_VALUE, "pipe() failed");
    const pid_t pid = fork();
    if (pid < 0) return fail(INVALID_VALUE, "fork() failed");
    if (pid == 0) {
        close(fds[0]);
        report_fd = fds[1];
        running_kernel = selftest_entry.name;
        const std::string err = ekemu::launch(EkDim3{1, 1, 1}, EkDim3{SELFTEST_THREADS, 1, 1}, 0, [&] { selftest_kernel(p); });
        _exit(err.empty() ? 0 : 1);
    }
    close(fds[1]);
    std::string report;
    char chunk[256];
    for (ssize_t got; (got = read(fds[0], chunk, sizeof chunk)) > 0;) report.append(chunk, (size_t)got);
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return SUCCESS;
    while (!report.empty() && report.back() == '\n') report.pop_back();
    last_error = report.empty() ? "the child ended without a report (status " + std::to_string(status) + ")" : report;
    return ILLEGAL_ADDRESS;
}

// Codes 12 and 13: the kernel writes the buffer on one stream, a copy on another reads it — with
// no ordering (a race), or after an event recorded behind the kernel (ordered).
CUresult streams_selftest(bool ordered, SelftestParams p, float* out) {
    CUstream a, b;
    cuStreamCreate(&a, 0);
    cuStreamCreate(&b, 0);
    Function f = selftest_function(32, SELFTEST_THREADS);
    void* args[] = {&p};
    CUresult r = launch(f, 1, 1, 1, SELFTEST_THREADS, 1, 1, 0, a, args, nullptr);
    CUevent e = nullptr;
    if (r == SUCCESS && ordered) {
        cuEventCreate(&e, 0);
        cuEventRecord(e, a);
        cuStreamWaitEvent(b, e, 0);
    }
    if (r == SUCCESS)
        r = cuMemcpyDtoHAsync_v2(out, reinterpret_cast<CUdeviceptr>(p.out), SELFTEST_THREADS * sizeof(float), b);
    if (e) cuEventDestroy_v2(e);
    cuStreamSynchronize(a);
    cuStreamSynchronize(b);
    cuStreamDestroy_v2(a);
    cuStreamDestroy_v2(b);
    return r;
}
}  // namespace

// Runs planted violation `code` through the launch path and returns the CUresult, the message in
// `msg`. 6: more dynamic shared memory than the function allows; 7: a write past the dynamic
// shared memory; 8 (in a child process): a read past an allocation; 9: a block beyond the launch
// bound; 10: cuFuncSetAttribute above the opt-in size less the static size; 11: registers × warps
// beyond the SM's file; 12: a copy on another stream reading what a kernel wrote, unordered; 13:
// the same ordered by an event (no violation).
EXPORT CUresult ek_cuda_emu_selftest(int code, float* out, char* msg, int len) {
    CUdeviceptr buf;
    if (cuMemAlloc_v2(&buf, SELFTEST_BYTES) != SUCCESS) return OUT_OF_MEMORY;
    SelftestParams p{code, reinterpret_cast<float*>(buf)};
    void* args[] = {&p};
    last_error.clear();
    CUresult r;
    bool copied = false;
    if (code == 8) {
        r = run_in_child(p);
    } else if (code == 12 || code == 13) {
        r = streams_selftest(code == 13, p, out);
        copied = true;
    } else if (code == 10) {
        Function f = selftest_function(32, SELFTEST_THREADS);
        r = cuFuncSetAttribute(&f, 8, f.device->optin - SELFTEST_STATIC + 1);
    } else {
        std::unique_lock<std::shared_mutex> g(launching);
        Function f = selftest_function(code == 11 ? 255 : 32, code == 11 ? 1024 : SELFTEST_THREADS);
        const unsigned threads = code == 9 ? 2 * SELFTEST_THREADS : code == 11 ? 1024 : SELFTEST_THREADS;
        const unsigned shared = code == 6 ? f.max_dynamic + 1 : 0;
        r = launch(f, 1, 1, 1, threads, 1, 1, shared, nullptr, args, nullptr);
        // Restore the guard bytes a planted overflow broke, so the buffer can be freed.
        std::memset(reinterpret_cast<unsigned char*>(buf) + SELFTEST_BYTES, GUARD_BYTE,
                    layout_of(SELFTEST_BYTES).padded - SELFTEST_BYTES);
    }
    if (r == SUCCESS && !copied) r = cuMemcpyDtoH_v2(out, buf, SELFTEST_THREADS * sizeof(float));
    std::snprintf(msg, len, "%s", last_error.c_str());
    cuMemFree_v2(buf);
    return r;
}

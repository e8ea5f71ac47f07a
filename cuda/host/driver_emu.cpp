// A test double of the CUDA driver library (feature `cuda-emu`): built as a shared object whose
// SONAME is `libcuda.so`, so once `cuda::emulator()` has loaded it, cudarc's run-time loading of
// "libcuda.so" finds it and the whole CUDA backend — argument packing, launch configurations,
// buffers, the kernels themselves — runs on the host. The kernels of cuda/ are compiled here
// unchanged against grid_shim.h; the module image the backend loads (fatbin or NVRTC cubin) is
// accepted and ignored, functions are looked up by name in the table below.
//
// One device, "compute capability 9.0", H100-like limits. Memory is host memory: each allocation
// starts 16-byte aligned (the kernels need no more) with guard bytes before it and in the few
// bytes rounding it up to 16, and ends against an inaccessible page. A kernel that writes into
// guard bytes fails its launch (CUDA_ERROR_ILLEGAL_ADDRESS); one that reads or writes 16 or more
// bytes past an allocation's end (or any address that is not memory) faults, and the emulator
// reports the kernel, block and thread on stderr and ends the process (there is no recovering a
// launch from inside a fiber). Copies and memsets must stay inside one allocation. A launch
// that breaks a grid_shim.h rule fails with CUDA_ERROR_LAUNCH_FAILED, and cuGetErrorString then
// returns the violation. Streams are synchronous (every call completes before it returns).

#include "grid_shim.h"

#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <atomic>
#include <map>
#include <mutex>
#include <shared_mutex>

#include "../../ffi/entropy_params.h"
#include "../common.cuh"
#include "../topk.cuh"
#include "../decode.cu"
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

namespace {

constexpr CUresult SUCCESS = 0, INVALID_VALUE = 1, INVALID_DEVICE = 101, INVALID_HANDLE = 400,
                   NOT_FOUND = 500, ILLEGAL_ADDRESS = 700, LAUNCH_FAILED = 719;

// Guard bytes before an allocation (and in its tail up to the 16-byte grid), and their pattern.
constexpr size_t GUARD = 256;
constexpr size_t ALIGN = 16;
constexpr unsigned char GUARD_BYTE = 0xA5;
// Fresh allocations are poisoned (NaN for every float type) so unwritten reads show up.
constexpr unsigned char POISON_BYTE = 0xFF;
// Limits reported for the device (H100 SXM).
constexpr int SHARED_PER_BLOCK = 48 * 1024, SHARED_OPTIN = 227 * 1024, SMS = 132;
constexpr const char* DEVICE_NAME = "entropy-kernels CUDA host emulator (sm_90)";

struct Kernel {
    const char* name;
    void (*run)(void** args);
    int max_dynamic_shared = SHARED_PER_BLOCK;
    std::atomic<unsigned> launches{0};
};

#define EK_KERNEL(name, Params) {#name, [](void** a) { name(*static_cast<Params*>(a[0])); }, SHARED_PER_BLOCK, {}},
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
    EK_KERNEL(ek_prefill_simt_f32, EkPrefillParams)
    EK_KERNEL(ek_prefill_simt_f16, EkPrefillParams)
    EK_KERNEL(ek_prefill_simt_bf16, EkPrefillParams)
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
    EK_KERNEL(ek_plan_softmax, EkPlanParams)
    EK_KERNEL(ek_plan_decide, EkPlanParams)
    EK_KERNEL(ek_plan_rank, EkPlanParams)
    EK_KERNEL(ek_plan_rank_wide, EkPlanParams)
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
};
#undef EK_KERNEL

std::mutex lock;
// Launches share it; the planted out-of-bounds write holds it alone until its guard is restored,
// so concurrent launches never see that guard broken.
std::shared_mutex launching;
std::map<CUdeviceptr, size_t> allocations;  // user address → user size
thread_local std::string last_error;
int context_tag, module_tag;
std::atomic<unsigned long long> launches{0};

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

// Whether [p, p + n) lies inside one live allocation.
bool inside(CUdeviceptr p, size_t n) {
    std::lock_guard<std::mutex> g(lock);
    auto it = allocations.upper_bound(p);
    if (it == allocations.begin()) return false;
    --it;
    return p >= it->first && p + n <= it->first + it->second;
}

CUresult fail(CUresult code, const std::string& what) {
    last_error = what;
    std::fprintf(stderr, "[cuda-emu] %s\n", what.c_str());
    return code;
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
// block barriers, bytes loaded by load_f32.
EXPORT void ek_cuda_emu_counters(unsigned long long* out) {
    out[0] = ekemu::counters.mma, out[1] = ekemu::counters.ldmatrix;
    out[2] = ekemu::counters.cp_async_bytes, out[3] = ekemu::counters.barriers;
    out[4] = ekemu::counters.ld_global_bytes;
}

// The order fibers are resumed in (ekemu::schedule).
EXPORT void ek_cuda_emu_schedule(unsigned order) { ekemu::schedule = order; }

// The multiprocessor count reported to backends opened from now on (launch-shape choices).
std::atomic<int> multiprocessors{SMS};
EXPORT void ek_cuda_emu_set_multiprocessors(int n) { multiprocessors = n > 0 ? n : SMS; }

EXPORT CUresult cuInit(unsigned) { return SUCCESS; }
EXPORT CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return SUCCESS;
}
EXPORT CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return SUCCESS;
}
EXPORT CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return INVALID_DEVICE;
    *d = 0;
    return SUCCESS;
}
EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    std::snprintf(name, len, "%s", DEVICE_NAME);
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
EXPORT CUresult cuDeviceGetAttribute(int* v, int attribute, CUdevice) {
    switch (attribute) {
        case 1: *v = 1024; break;                  // max threads per block
        case 8: *v = SHARED_PER_BLOCK; break;      // shared memory per block
        case 10: *v = 32; break;                   // warp size
        case 16: *v = multiprocessors; break;      // multiprocessors
        case 75: *v = 9; break;                    // compute capability
        case 76: *v = 0; break;
        case 81: *v = 228 * 1024; break;           // shared memory per multiprocessor
        case 97: *v = SHARED_OPTIN; break;         // opt-in shared memory per block
        case 115: *v = 0; break;                   // no memory pools: cuMemAlloc
        default: *v = 0;
    }
    return SUCCESS;
}
EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) {
    *c = &context_tag;
    return SUCCESS;
}
EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return SUCCESS; }
EXPORT CUresult cuCtxSetCurrent(CUcontext) { return SUCCESS; }
EXPORT CUresult cuCtxGetCurrent(CUcontext* c) {
    *c = &context_tag;
    return SUCCESS;
}
EXPORT CUresult cuCtxSynchronize() { return SUCCESS; }
EXPORT CUresult cuCtxSetFlags(unsigned) { return SUCCESS; }

EXPORT CUresult cuStreamCreate(CUstream* s, unsigned) {
    *s = new int(0);
    return SUCCESS;
}
EXPORT CUresult cuStreamDestroy_v2(CUstream s) {
    delete static_cast<int*>(s);
    return SUCCESS;
}
EXPORT CUresult cuStreamSynchronize(CUstream) { return SUCCESS; }
EXPORT CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return SUCCESS; }
EXPORT CUresult cuEventCreate(CUevent* e, unsigned) {
    *e = new int(0);
    return SUCCESS;
}
EXPORT CUresult cuEventDestroy_v2(CUevent e) {
    delete static_cast<int*>(e);
    return SUCCESS;
}
EXPORT CUresult cuEventRecord(CUevent, CUstream) { return SUCCESS; }
EXPORT CUresult cuEventSynchronize(CUevent) { return SUCCESS; }
EXPORT CUresult cuEventQuery(CUevent) { return SUCCESS; }

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    install_fault_handler();
    const Layout l = layout_of(n);
    void* map = mmap(nullptr, l.total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) return 2;  // CUDA_ERROR_OUT_OF_MEMORY
    auto* b = static_cast<unsigned char*>(map);
    if (mprotect(b + l.accessible, l.total - l.accessible, PROT_NONE) != 0) {
        munmap(map, l.total);
        return 2;
    }
    unsigned char* user = b + l.accessible - l.padded;
    std::memset(b, GUARD_BYTE, l.accessible);
    std::memset(user, POISON_BYTE, n);
    *p = reinterpret_cast<CUdeviceptr>(user);
    std::lock_guard<std::mutex> g(lock);
    allocations[*p] = n;
    return SUCCESS;
}
EXPORT CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, CUstream) { return cuMemAlloc_v2(p, n); }
EXPORT CUresult cuMemFree_v2(CUdeviceptr p) {
    size_t n;
    {
        std::lock_guard<std::mutex> g(lock);
        auto it = allocations.find(p);
        if (it == allocations.end()) return fail(INVALID_VALUE, "cuMemFree of an address cuMemAlloc did not return");
        n = it->second;
        allocations.erase(it);
    }
    const bool ok = guards_intact(p, n);
    const Layout l = layout_of(n);
    munmap(base_of(p, l), l.total);
    return ok ? SUCCESS : fail(ILLEGAL_ADDRESS, "an allocation's guard bytes were overwritten before cuMemFree");
}
EXPORT CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { return cuMemFree_v2(p); }

EXPORT CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, CUstream) {
    if (!inside(p, n)) return fail(INVALID_VALUE, "cuMemsetD8 outside an allocation");
    std::memset(reinterpret_cast<void*>(p), v, n);
    return SUCCESS;
}
EXPORT CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) { return cuMemsetD8Async(p, v, n, nullptr); }
EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream) {
    if (!inside(dst, n)) return fail(INVALID_VALUE, "cuMemcpyHtoD outside an allocation");
    std::memcpy(reinterpret_cast<void*>(dst), src, n);
    return SUCCESS;
}
EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    return cuMemcpyHtoDAsync_v2(dst, src, n, nullptr);
}
EXPORT CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream) {
    if (!inside(src, n)) return fail(INVALID_VALUE, "cuMemcpyDtoH outside an allocation");
    std::memcpy(dst, reinterpret_cast<const void*>(src), n);
    return SUCCESS;
}
EXPORT CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    return cuMemcpyDtoHAsync_v2(dst, src, n, nullptr);
}
EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream) {
    if (!inside(dst, n) || !inside(src, n)) return fail(INVALID_VALUE, "cuMemcpyDtoD outside an allocation");
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return SUCCESS;
}
EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return cuMemcpyDtoDAsync_v2(dst, src, n, nullptr);
}

EXPORT CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    if (!image) return INVALID_VALUE;
    *m = &module_tag;
    return SUCCESS;
}
EXPORT CUresult cuModuleUnload(CUmodule) { return SUCCESS; }
EXPORT CUresult cuModuleGetFunction(void** f, CUmodule, const char* name) {
    for (auto& k : kernels)
        if (std::strcmp(k.name, name) == 0) {
            *f = &k;
            return SUCCESS;
        }
    return fail(NOT_FOUND, std::string("no kernel named ") + name + " in cuda/host/driver_emu.cpp's table");
}
EXPORT CUresult cuFuncSetAttribute(void* f, int attribute, int value) {
    if (attribute == 8) {  // max dynamic shared memory
        if (value < 0 || value > SHARED_OPTIN) return INVALID_VALUE;
        static_cast<Kernel*>(f)->max_dynamic_shared = value;
    }
    return SUCCESS;
}
EXPORT CUresult cuFuncGetAttribute(int* v, int attribute, void* f) {
    *v = attribute == 8 ? static_cast<Kernel*>(f)->max_dynamic_shared : attribute == 0 ? 1024 : 0;
    return SUCCESS;
}

namespace {
CUresult launch(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned shared,
                void** params, void** extra) {
    const Kernel& k = *static_cast<Kernel*>(f);
    if (extra) return fail(INVALID_VALUE, std::string(k.name) + ": `extra` launch arguments are not emulated");
    if ((int)shared > k.max_dynamic_shared)
        return fail(INVALID_VALUE, std::string(k.name) + ": " + std::to_string(shared) +
                                       " bytes of dynamic shared memory above the function's limit " +
                                       std::to_string(k.max_dynamic_shared));
    if (gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535)
        return fail(INVALID_VALUE, std::string(k.name) + ": grid outside the device limits");
    launches++;
    const_cast<Kernel&>(k).launches++;
    running_kernel = k.name;
    const std::string err =
        ekemu::launch(EkDim3{gx, gy, gz}, EkDim3{bx, by, bz}, shared, [&] { k.run(params); });
    running_kernel = nullptr;
    if (!err.empty()) return fail(LAUNCH_FAILED, std::string(k.name) + ": " + err);
    std::lock_guard<std::mutex> g(lock);
    for (auto& [p, n] : allocations)
        if (!guards_intact(p, n))
            return fail(ILLEGAL_ADDRESS, std::string(k.name) + " wrote outside an allocation (guard bytes changed)");
    return SUCCESS;
}
}  // namespace

EXPORT CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                               unsigned shared, CUstream, void** params, void** extra) {
    std::shared_lock<std::shared_mutex> g(launching);
    return launch(f, gx, gy, gz, bx, by, bz, shared, params, extra);
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
        case INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case ILLEGAL_ADDRESS: *s = "CUDA_ERROR_ILLEGAL_ADDRESS"; break;
        case LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
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
constexpr unsigned SELFTEST_THREADS = 64;
constexpr size_t SELFTEST_BYTES = (SELFTEST_THREADS + 1) * sizeof(float);

void selftest_kernel(SelftestParams p) {
    const unsigned t = threadIdx.x, lane = t % 32;
    float v = (float)t;
    switch (p.code) {
        case 0:  // every rule kept: a barrier, a shuffle, a ballot
            __syncthreads();
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += (float)__popc(__ballot_sync(0xffffffffu, t % 2));
            break;
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
    }
    p.out[t] = v;
}
Kernel selftest_entry{"selftest", [](void** a) { selftest_kernel(*static_cast<SelftestParams*>(a[0])); }, SHARED_PER_BLOCK, {}};

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
}  // namespace

// Runs planted violation `code` (6: a launch asking for more dynamic shared memory than the
// function allows; 7: a write past the dynamic shared memory; 8, in a child process: a read past
// an allocation) through cuLaunchKernel; the CUresult, and the message in `msg`.
EXPORT CUresult ek_cuda_emu_selftest(int code, float* out, char* msg, int len) {
    CUdeviceptr buf;
    if (cuMemAlloc_v2(&buf, SELFTEST_BYTES) != SUCCESS) return 2;
    SelftestParams p{code, reinterpret_cast<float*>(buf)};
    void* args[] = {&p};
    last_error.clear();
    const unsigned shared = code == 6 ? SHARED_PER_BLOCK + 1 : 0;
    CUresult r;
    if (code == 8) {
        r = run_in_child(p);
    } else {
        std::unique_lock<std::shared_mutex> g(launching);
        r = launch(&selftest_entry, 1, 1, 1, SELFTEST_THREADS, 1, 1, shared, args, nullptr);
        // Restore the guard bytes a planted overflow broke, so the buffer can be freed.
        std::memset(reinterpret_cast<unsigned char*>(buf) + SELFTEST_BYTES, GUARD_BYTE,
                    layout_of(SELFTEST_BYTES).padded - SELFTEST_BYTES);
    }
    if (r == SUCCESS) r = cuMemcpyDtoH_v2(out, buf, SELFTEST_THREADS * sizeof(float));
    std::snprintf(msg, len, "%s", last_error.c_str());
    cuMemFree_v2(buf);
    return r;
}

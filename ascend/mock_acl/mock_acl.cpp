// A stand-in for libascendcl.so, for testing the ACL runtime path without an NPU: it implements
// the prototypes of ffi/acl_min.h (so a signature drift fails to compile) over host memory, and
// runs each launch on the Ascend C emulator. What it checks, as the real runtime documents:
//   - aclInit before anything; aclrtSetDevice before memory, streams and loads;
//   - the binary magic of aclrtBinaryLoadFromData equals the one the kernel was built for;
//   - aclrtLaunchKernel's argsData is device memory (allocated here): one GM_ADDR for a vector
//     kernel, two for a mixed one (the hardware sync address of aclrtGetHardwareSyncAddr first);
//   - a mixed binary names its entries <name>_mix_aic / <name>_mix_aiv (no bare name);
//   - a kernel that never ends (an emulated cross-core deadlock) leaves the stream busy: the sync
//     fails with a timeout (aclrtSynchronizeStreamWithTimeout) instead of hanging;
//   - memcpy bounds (count <= destMax) and frees of unknown pointers;
//   - a current context on the calling thread: aclrtSetDevice makes the device's default context
//     current on its thread only; any other thread's runtime calls fail until it calls
//     aclrtSetCurrentContext (or aclrtSetDevice) itself.
// Failure injection: ek_mock_acl_fail("<api name>") makes that call fail with code 507899.
// Traffic: ek_mock_acl_traffic counts the bytes copied host→device and device→host and the bytes
// allocated since the process started (what a resident cache must keep off the PCIe bus).
// The kernel "binary" is the text "ekmock <symbol>,<symbol>... <magic hex>".

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "acl_min.h"

extern "C" int ek_emu_run(const char* kernel, const uint64_t* args, size_t nargs, uint32_t block_dim, char* err, size_t err_len);
extern "C" uint64_t ek_emu_hardware_sync_addr();

namespace {
constexpr aclError kNotInit = 100000;       // ACL_ERROR_UNINITIALIZE
constexpr aclError kInvalid = 100001;       // ACL_ERROR_INVALID_PARAM
constexpr aclError kInjected = 507899;
constexpr aclError kNoContext = 107002;      // ACL_ERROR_RT_CONTEXT_NULL
constexpr aclError kKernelFailed = 507015;  // an AI core exception, as the runtime reports it
constexpr aclError kSyncTimeout = 507046;   // the stream did not drain in time

std::mutex mu;
bool initialised = false;
thread_local int device = -1;  // the device of this thread's current context
int default_context[1];           // the default context of device 0 (its address is the handle)
int engine_context[1];            // another context on device 0, as an engine's own (tests)
thread_local void* current = nullptr;  // this thread's current context
std::map<uintptr_t, size_t> allocations;
std::string last_error;
uint64_t traffic[3] = {0, 0, 0};  // host→device bytes, device→host bytes, bytes allocated
uint64_t blocked_destroys = 0;     // aclrtDestroyStream calls on a stream that never drains

struct Binary {
    std::string symbols;  // comma-separated entries
    uint32_t magic;
};

struct Function {
    std::string symbol;
};

aclError fail(aclError code, const std::string& msg) {
    last_error = msg;
    return code;
}

std::string failing;

bool injected(const char* api) { return failing == api; }

#define MOCK_ENTRY(NAME)                                                                       \
    std::lock_guard<std::mutex> lock(mu);                                                      \
    if (injected(NAME)) return fail(kInjected, std::string("mock: injected failure of ") + NAME); \
    if (std::strcmp(NAME, "aclInit") != 0 && !initialised) return fail(kNotInit, "mock: aclInit not called")

#define NEED_DEVICE() \
    if (device < 0) return fail(kNoContext, "mock: no current context on this thread (aclrtSetDevice or aclrtSetCurrentContext)")

bool is_device(const void* p, size_t bytes) {
    auto it = allocations.upper_bound(reinterpret_cast<uintptr_t>(p));
    if (it == allocations.begin()) return false;
    --it;
    return reinterpret_cast<uintptr_t>(p) + bytes <= it->first + it->second;
}
}  // namespace

extern "C" {

aclError aclInit(const char*) {
    MOCK_ENTRY("aclInit");
    if (initialised) return fail(ACL_ERROR_REPEAT_INITIALIZE, "mock: repeated aclInit");
    initialised = true;
    return ACL_SUCCESS;
}

aclError aclrtGetDeviceCount(uint32_t* count) {
    MOCK_ENTRY("aclrtGetDeviceCount");
    *count = 1;
    return ACL_SUCCESS;
}

aclError aclrtSetDevice(int32_t id) {
    MOCK_ENTRY("aclrtSetDevice");
    if (id != 0) return fail(kInvalid, "mock: only device 0 exists");
    device = id;
    current = &default_context[0];
    return ACL_SUCCESS;
}

aclError aclrtResetDevice(int32_t) {
    MOCK_ENTRY("aclrtResetDevice");
    device = -1;
    current = nullptr;
    return ACL_SUCCESS;
}

aclError aclrtGetCurrentContext(aclrtContext* ctx) {
    MOCK_ENTRY("aclrtGetCurrentContext");
    NEED_DEVICE();
    *ctx = current;
    return ACL_SUCCESS;
}

aclError aclrtSetCurrentContext(aclrtContext ctx) {
    MOCK_ENTRY("aclrtSetCurrentContext");
    if (ctx != &default_context[0] && ctx != &engine_context[0]) return fail(kInvalid, "mock: not a context of this runtime");
    device = 0;
    current = ctx;
    return ACL_SUCCESS;
}

aclError aclrtCreateStream(aclrtStream* s) {
    MOCK_ENTRY("aclrtCreateStream");
    NEED_DEVICE();
    *s = new int(0);  // the stream's state: 1 once a launched kernel never ends
    return ACL_SUCCESS;
}

aclError aclrtDestroyStream(aclrtStream s) {
    MOCK_ENTRY("aclrtDestroyStream");
    NEED_DEVICE();
    if (*static_cast<int*>(s)) {
        blocked_destroys++;  // ACL waits for the stream's tasks: this call would never return
        return fail(kInvalid, "mock: aclrtDestroyStream of a stream whose kernel never ends would block forever");
    }
    delete static_cast<int*>(s);
    return ACL_SUCCESS;
}

aclError aclrtSynchronizeStream(aclrtStream s) {
    MOCK_ENTRY("aclrtSynchronizeStream");
    NEED_DEVICE();
    if (*static_cast<int*>(s)) return fail(kInvalid, "mock: the stream never drains and no timeout was given (the process would hang)");
    return ACL_SUCCESS;  // launches run to completion synchronously
}

aclError aclrtSynchronizeStreamWithTimeout(aclrtStream s, int32_t timeout) {
    MOCK_ENTRY("aclrtSynchronizeStreamWithTimeout");
    NEED_DEVICE();
    int& hung = *static_cast<int*>(s);
    if (hung) {
        // The task keeps running (ACL does not abort it: aclrtStreamAbort would): the stream
        // stays busy.
        if (timeout < 0) return fail(kInvalid, "mock: the stream never drains and the timeout is -1 (the process would hang)");
        return fail(kSyncTimeout, "mock: stream synchronize timeout after " + std::to_string(timeout) + " ms (a kernel never ended)");
    }
    return ACL_SUCCESS;
}

aclError aclrtGetDeviceInfo(uint32_t dev, aclrtDevAttr attr, int64_t* value) {
    MOCK_ENTRY("aclrtGetDeviceInfo");
    if (dev != 0) return fail(kInvalid, "mock: only device 0 exists");
    switch (attr) {
        case ACL_DEV_ATTR_AICORE_CORE_NUM: *value = 4; break;
        case ACL_DEV_ATTR_VECTOR_CORE_NUM: *value = 8; break;
        default: *value = 0;
    }
    return ACL_SUCCESS;
}

aclError aclrtGetHardwareSyncAddr(void** addr) {
    MOCK_ENTRY("aclrtGetHardwareSyncAddr");
    NEED_DEVICE();
    *addr = reinterpret_cast<void*>(ek_emu_hardware_sync_addr());
    return ACL_SUCCESS;
}

aclError aclrtMalloc(void** p, size_t size, aclrtMemMallocPolicy) {
    MOCK_ENTRY("aclrtMalloc");
    NEED_DEVICE();
    if (size == 0) return fail(kInvalid, "mock: aclrtMalloc of 0 bytes");
    traffic[2] += size;
    *p = std::aligned_alloc(512, (size + 511) / 512 * 512);
    std::memset(*p, 0xA5, size);  // device memory is not zeroed
    allocations[reinterpret_cast<uintptr_t>(*p)] = size;
    return ACL_SUCCESS;
}

aclError aclrtFree(void* p) {
    MOCK_ENTRY("aclrtFree");
    NEED_DEVICE();
    if (!allocations.erase(reinterpret_cast<uintptr_t>(p))) return fail(kInvalid, "mock: aclrtFree of an unknown pointer");
    std::free(p);
    return ACL_SUCCESS;
}

aclError aclrtMemset(void* p, size_t max, int32_t value, size_t count) {
    MOCK_ENTRY("aclrtMemset");
    NEED_DEVICE();
    if (count > max || !is_device(p, count)) return fail(kInvalid, "mock: aclrtMemset outside an allocation");
    std::memset(p, value, count);
    return ACL_SUCCESS;
}

aclError aclrtMemcpy(void* dst, size_t max, const void* src, size_t count, aclrtMemcpyKind kind) {
    MOCK_ENTRY("aclrtMemcpy");
    NEED_DEVICE();
    if (count > max) return fail(kInvalid, "mock: aclrtMemcpy count > destMax");
    const bool dst_dev = kind == ACL_MEMCPY_HOST_TO_DEVICE || kind == ACL_MEMCPY_DEVICE_TO_DEVICE;
    const bool src_dev = kind == ACL_MEMCPY_DEVICE_TO_HOST || kind == ACL_MEMCPY_DEVICE_TO_DEVICE;
    if (dst_dev != is_device(dst, count) || src_dev != is_device(src, count))
        return fail(kInvalid, "mock: aclrtMemcpy kind does not match where the pointers live");
    std::memcpy(dst, src, count);
    if (kind == ACL_MEMCPY_HOST_TO_DEVICE) traffic[0] += count;
    if (kind == ACL_MEMCPY_DEVICE_TO_HOST) traffic[1] += count;
    return ACL_SUCCESS;
}

aclError aclrtBinaryLoadFromData(const void* data, size_t length, const aclrtBinaryLoadOptions* options, aclrtBinHandle* h) {
    MOCK_ENTRY("aclrtBinaryLoadFromData");
    NEED_DEVICE();
    std::string text(static_cast<const char*>(data), length);
    char symbols[1024];
    unsigned magic = 0;
    if (std::sscanf(text.c_str(), "ekmock %1023s %x", symbols, &magic) != 2) return fail(kInvalid, "mock: not a kernel binary");
    uint32_t given = 0;
    for (size_t i = 0; options && i < options->numOpt; i++)
        if (options->options[i].type == ACL_RT_LOAD_BINARY_OPT_MAGIC) given = options->options[i].value.magic;
    if (given != magic) return fail(kInvalid, "mock: binary magic does not match the kernel's core type");
    *h = new Binary{std::string(",") + symbols + ",", magic};
    return ACL_SUCCESS;
}

aclError aclrtBinaryGetFunction(const aclrtBinHandle h, const char* name, aclrtFuncHandle* f) {
    MOCK_ENTRY("aclrtBinaryGetFunction");
    NEED_DEVICE();
    auto* b = static_cast<Binary*>(h);
    if (b->symbols.find(std::string(",") + name + ",") == std::string::npos)
        return fail(kInvalid, std::string("mock: no function ") + name + " in the binary");
    static std::map<std::string, Function> functions;  // handles live as long as the process
    *f = &(functions[name] = Function{name});
    return ACL_SUCCESS;
}

aclError aclrtBinaryUnLoad(aclrtBinHandle h) {
    MOCK_ENTRY("aclrtBinaryUnLoad");
    NEED_DEVICE();
    delete static_cast<Binary*>(h);
    return ACL_SUCCESS;
}

aclError aclrtLaunchKernel(aclrtFuncHandle f, uint32_t block_dim, const void* args, size_t size, aclrtStream s) {
    MOCK_ENTRY("aclrtLaunchKernel");
    NEED_DEVICE();
    if (size != sizeof(uint64_t) && size != 2 * sizeof(uint64_t))
        return fail(kInvalid, "mock: kernels take one GM_ADDR (vector) or two (mixed: sync address, params)");
    if (!is_device(args, size)) return fail(kInvalid, "mock: argsData is not device memory");
    uint64_t a[2] = {0, 0};
    std::memcpy(a, args, size);
    const size_t n = size / sizeof(uint64_t);
    if (n == 2 && a[0] != ek_emu_hardware_sync_addr())
        return fail(kInvalid, "mock: a mixed kernel's first argument is not aclrtGetHardwareSyncAddr's address");
    if (!is_device(reinterpret_cast<void*>(a[n - 1]), 1)) return fail(kInvalid, "mock: the params GM_ADDR is not device memory");
    char err[1024] = {0};
    const int rc = ek_emu_run(static_cast<Function*>(f)->symbol.c_str(), a, n, block_dim, err, sizeof(err));
    if (rc != 0 && std::strstr(err, "deadlock")) {
        *static_cast<int*>(s) = 1;  // on the device the launch returns and this stream never drains
        return ACL_SUCCESS;
    }
    if (rc != 0) return fail(kKernelFailed, std::string("mock: kernel failed: ") + err);
    return ACL_SUCCESS;
}

void ek_mock_acl_fail(const char* api) {
    std::lock_guard<std::mutex> lock(mu);
    failing = api ? api : "";
}

// Makes the engine's own context current on the calling thread (device 0, not ours).
void ek_mock_acl_use_engine_context() { current = &engine_context[0]; device = 0; }

// Whether the calling thread's current context is the engine's.
int ek_mock_acl_engine_context_current() { return current == &engine_context[0]; }

// aclrtDestroyStream calls that would have blocked forever.
uint64_t ek_mock_acl_blocked_destroys() {
    std::lock_guard<std::mutex> lock(mu);
    return blocked_destroys;
}

void ek_mock_acl_traffic(uint64_t out[3]) {
    std::lock_guard<std::mutex> lock(mu);
    for (int i = 0; i < 3; i++) out[i] = traffic[i];
}

const char* aclGetRecentErrMsg(void) {
    return last_error.empty() ? nullptr : last_error.c_str();
}

}  // extern "C"

// C entry points of the emulator for the Rust side: run a kernel by name on `block_dim` emulated
// cores with its params struct in "global memory" (host memory), report the first rule broken.

#include <cstdio>
#include <cstring>
#include <string>

#include "kernel_operator.h"

extern "C" void ek_decode(uint8_t* params);
extern "C" void ek_attend(uint8_t* params);
extern "C" void ek_compress_stats(uint8_t* params);
extern "C" void ek_compress_means(uint8_t* params);
extern "C" void ek_compress_pool(uint8_t* params);
extern "C" void ek_compress_topk(uint8_t* params);
extern "C" void ek_compress_select(uint8_t* params);
extern "C" void ek_compress_gather(uint8_t* params);
extern "C" void ek_compress_compact(uint8_t* params);
extern "C" void ek_append(uint8_t* params);
extern "C" void ek_compress_cube_stats(uint8_t* sync, uint8_t* params);
extern "C" void ek_compress_cube_means(uint8_t* sync, uint8_t* params);
extern "C" void ek_prefill(uint8_t* sync, uint8_t* params);
extern "C" void ek_prefill_vec(uint8_t* params);
extern "C" void ek_plan_reps(uint8_t* params);
extern "C" void ek_emu_selftest_kernel(uint8_t* which);
extern "C" void ek_emu_selftest_cube(uint8_t* sync, uint8_t* which);

namespace {
// A vector kernel takes its params' address; a mixed (cube + vector) one first the hardware sync
// address, then its params'.
struct Entry {
    const char* name;
    void (*vec)(uint8_t*) = nullptr;
    void (*mix)(uint8_t*, uint8_t*) = nullptr;
};
const Entry kKernels[] = {
    {"ek_decode", ek_decode},
    {"ek_attend", ek_attend},
    {"ek_compress_stats", ek_compress_stats},
    {"ek_compress_means", ek_compress_means},
    {"ek_compress_pool", ek_compress_pool},
    {"ek_compress_topk", ek_compress_topk},
    {"ek_compress_select", ek_compress_select},
    {"ek_compress_gather", ek_compress_gather},
    {"ek_compress_compact", ek_compress_compact},
    {"ek_append", ek_append},
    {"ek_compress_cube_stats", nullptr, ek_compress_cube_stats},
    {"ek_compress_cube_means", nullptr, ek_compress_cube_means},
    {"ek_prefill", nullptr, ek_prefill},
    {"ek_prefill_vec", ek_prefill_vec},
    {"ek_plan_reps", ek_plan_reps},
    {"selftest", ek_emu_selftest_kernel},
    {"selftest_cube", nullptr, ek_emu_selftest_cube},
};
// A mixed kernel's binary carries its entry twice, `<name>_mix_aic` and `<name>_mix_aiv` (the
// compiler's symbols for the cube and the vector half): the host looks up the `_mix_aic` one.
constexpr const char* kMixSuffix = "_mix_aic";
}  // namespace

// Runs `kernel` on `block_dim` cores with the argument block `args` (`nargs` 64-bit values, as
// the host would pass them to aclrtLaunchKernel).
extern "C" int ek_emu_run(const char* kernel, const uint64_t* args, size_t nargs, uint32_t block_dim, char* err, size_t err_len) {
    try {
        const std::string name = kernel;
        for (const Entry& e : kKernels) {
            if (e.vec && name == e.name) {
                if (nargs != 1) throw AscendC::EmuError(name + " takes 1 argument (its params' address), got " + std::to_string(nargs));
                uint8_t* params = reinterpret_cast<uint8_t*>(args[0]);
                ekemu::Launch(block_dim, [&] { e.vec(params); });
                return 0;
            }
            if (e.mix && name == e.name)
                throw AscendC::EmuError("no entry " + name + ": a mixed kernel's binary has " + name + "_mix_aic and " + name + "_mix_aiv");
            if (e.mix && name == std::string(e.name) + kMixSuffix) {
                if (nargs != 2)
                    throw AscendC::EmuError(name + " takes 2 arguments (the hardware sync address, its params' address), got " +
                                            std::to_string(nargs));
                uint8_t* sync = reinterpret_cast<uint8_t*>(args[0]);
                uint8_t* params = reinterpret_cast<uint8_t*>(args[1]);
                ekemu::LaunchMix(block_dim, [&] { e.mix(sync, params); });
                return 0;
            }
        }
        std::snprintf(err, err_len, "no emulated kernel named %s", kernel);
        return 2;
    } catch (const std::exception& e) {
        std::snprintf(err, err_len, "%s", e.what());
        return 1;
    }
}

#include <cstddef>

#include "entropy_params.h"

// The params layout as the kernels' compiler sees it, for the Rust side to compare with its own.
extern "C" size_t ek_emu_layout(uint64_t* out, size_t n) {
    const uint64_t v[] = {
        sizeof(EkTensor),          offsetof(EkTensor, shape),
        sizeof(EkDecodeParams),    offsetof(EkDecodeParams, lengths),   offsetof(EkDecodeParams, group),
        offsetof(EkDecodeParams, scale_log2), offsetof(EkDecodeParams, dtype),
        sizeof(EkPrefillParams),   offsetof(EkPrefillParams, lse),      offsetof(EkPrefillParams, scale_log2),
        sizeof(EkPlanParams),      offsetof(EkPlanParams, order),       offsetof(EkPlanParams, e_t),
        sizeof(EkCompressParams),  offsetof(EkCompressParams, stats),   offsetof(EkCompressParams, scale_log2),
        offsetof(EkCompressParams, workspace),
    };
    const size_t count = sizeof(v) / sizeof(v[0]);
    for (size_t i = 0; i < n && i < count; i++) out[i] = v[i];
    return count;
}

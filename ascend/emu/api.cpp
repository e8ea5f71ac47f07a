// C entry points of the emulator for the Rust side: run a kernel by name on `block_dim` emulated
// cores with its params struct in "global memory" (host memory), report the first rule broken.

#include <cstdio>
#include <cstring>
#include <string>

#include "kernel_operator.h"

extern "C" void ek_decode(uint8_t* params);
extern "C" void ek_compress_stats(uint8_t* params);
extern "C" void ek_compress_means(uint8_t* params);
extern "C" void ek_compress_pool(uint8_t* params);
extern "C" void ek_compress_topk(uint8_t* params);
extern "C" void ek_compress_select(uint8_t* params);
extern "C" void ek_compress_gather(uint8_t* params);
extern "C" void ek_compress_cube_stats(uint8_t* params);
extern "C" void ek_compress_cube_means(uint8_t* params);
extern "C" void ek_prefill(uint8_t* params);
extern "C" void ek_prefill_vec(uint8_t* params);
extern "C" void ek_plan_reps(uint8_t* params);
extern "C" void ek_emu_selftest_kernel(uint8_t* which);
extern "C" void ek_emu_selftest_mix(uint8_t* which);

namespace {
struct Entry {
    const char* name;
    void (*fn)(uint8_t*);
    bool mix = false;  // cube + vector (AIC with two AIVs per core)
};
const Entry kKernels[] = {
    {"ek_decode", ek_decode},
    {"ek_compress_stats", ek_compress_stats},
    {"ek_compress_means", ek_compress_means},
    {"ek_compress_pool", ek_compress_pool},
    {"ek_compress_topk", ek_compress_topk},
    {"ek_compress_select", ek_compress_select},
    {"ek_compress_gather", ek_compress_gather},
    {"ek_compress_cube_stats", ek_compress_cube_stats, true},
    {"ek_compress_cube_means", ek_compress_cube_means, true},
    {"ek_prefill", ek_prefill, true},
    {"ek_prefill_vec", ek_prefill_vec},
    {"ek_plan_reps", ek_plan_reps},
    {"selftest", ek_emu_selftest_kernel},
    {"selftest_mix", ek_emu_selftest_mix, true},
};
}  // namespace

extern "C" int ek_emu_run(const char* kernel, const void* params, uint32_t block_dim, char* err, size_t err_len) {
    try {
        for (const Entry& e : kKernels) {
            if (std::strcmp(e.name, kernel) == 0) {
                uint8_t* arg = static_cast<uint8_t*>(const_cast<void*>(params));
                if (e.mix) {
                    ekemu::LaunchMix(block_dim, [&] { e.fn(arg); });
                } else {
                    ekemu::Launch(block_dim, [&] { e.fn(arg); });
                }
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

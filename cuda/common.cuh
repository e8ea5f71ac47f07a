// Shared device helpers. No CUDA headers are included, so NVRTC needs no include path: half
// types are 16-bit storage with PTX conversions (sm_80+), exp2 is the hardware ex2.

#pragma once

struct f16_t {
    unsigned short x;
};
struct bf16_t {
    unsigned short x;
};

__device__ __forceinline__ float to_f32(float x) { return x; }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }

#ifdef EK_CUDA_HOST
// The host emulator (cuda/host/grid_shim.h) supplies the conversions and the warp-wide mma.
__device__ __forceinline__ float to_f32(f16_t h) { return ek_half_to_f32(h.x); }
__device__ __forceinline__ float to_f32(bf16_t h) { return ek_bf16_to_f32(h.x); }
template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float x) { return f16_t{ek_f32_to_half(x)}; }
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float x) { return bf16_t{ek_f32_to_bf16(x)}; }
__device__ __forceinline__ void mma_f16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    ek_mma_m16n8k16<ek_half_to_f32>(c, a, b0, b1);
}
__device__ __forceinline__ void mma_bf16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    ek_mma_m16n8k16<ek_bf16_to_f32>(c, a, b0, b1);
}
__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
    return (uint32_t)ek_f32_to_half(lo) | ((uint32_t)ek_f32_to_half(hi) << 16);
}
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    return (uint32_t)ek_f32_to_bf16(lo) | ((uint32_t)ek_f32_to_bf16(hi) << 16);
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const unsigned short* row) { ek_ldmatrix_x4<false>(r, row); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const unsigned short* row) { ek_ldmatrix_x4<true>(r, row); }
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int bytes) { ekemu::cp_async(smem, gmem, 16, bytes); }
__device__ __forceinline__ void cp_async_commit() { ekemu::cp_async_commit(); }
template <int N> __device__ __forceinline__ void cp_async_wait() { ekemu::cp_async_wait(N); }
__device__ __forceinline__ void ld_global_16(const void* p, uint32_t* w) { ekemu::ld_global(w, p, 16); }
template <typename T> __device__ __forceinline__ T ld_global_elem(const T* p) {
    T v;
    ekemu::ld_global(&v, p, sizeof(T));
    return v;
}
#else
#define EK_DYNAMIC_SHARED(T, name) extern __shared__ T name[]

__device__ __forceinline__ float to_f32(f16_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.x));
    return f;
}
__device__ __forceinline__ float to_f32(bf16_t h) { return __uint_as_float(((unsigned)h.x) << 16); }
template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float x) {
    f16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.x) : "f"(x));
    return h;
}
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float x) {
    bf16_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.x) : "f"(x));
    return h;
}

// c += a·b for one warp-wide m16n8k16 tile: A row-major (4 registers of 16-bit pairs), B
// column-major (2 registers), f32 accumulators; `ty` the 16-bit input type.
#define EK_MMA_M16N8K16(name, ty)                                                                      \
    __device__ __forceinline__ void name(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {      \
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." ty "." ty                                \
                     ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"                     \
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                  \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                 \
    }
EK_MMA_M16N8K16(mma_f16, "f16")
EK_MMA_M16N8K16(mma_bf16, "bf16")
// Two f32 → one register of 16-bit values, lo in the low half.
__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ unsigned shared_address(const void* p) {
    unsigned s;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(s) : "l"(p));
    return s;
}

// Four 8×8 tiles of 16-bit values from shared memory, one instruction per warp: lane l gives the
// address of row l % 8 of tile l / 8; register i gets tile i in the mma fragment layout (row
// lane / 4, columns 2·(lane % 4) and + 1), or transposed with `_trans`.
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const unsigned short* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const unsigned short* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
}

// 16 bytes global → shared with no register staging (cp.async, sm_80; .cg: cached in L2 only);
// the first `bytes` come from gmem, the rest are zero (bytes 0: a zero fill, gmem not read).
// Complete once a later cp_async_wait<N> leaves at most N newer groups in flight.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(shared_address(smem)), "l"(gmem), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// 16 bytes from global memory in one vector load (p 16-byte aligned), through the read-only path.
__device__ __forceinline__ void ld_global_16(const void* p, uint32_t* w) {
    asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
}
template <typename T> __device__ __forceinline__ T ld_global_elem(const T* p) { return *p; }
#endif

// VEC consecutive elements at p as floats: one 16-byte load when VEC·sizeof(T) = 16 (p aligned
// to 16 bytes), else VEC = 1.
template <typename T, int VEC> __device__ __forceinline__ void load_f32(const T* p, float* out) {
    if constexpr (VEC == 1) {
        out[0] = to_f32(ld_global_elem(p));
    } else {
        static_assert(VEC * sizeof(T) == 16, "vector loads are 16 bytes");
        uint32_t w[4];
        ld_global_16(p, w);
#pragma unroll
        for (int e = 0; e < VEC; e++) {
            if constexpr (sizeof(T) == 4) out[e] = __uint_as_float(w[e]);
            else out[e] = to_f32(T{(unsigned short)(w[e / 2] >> (16 * (e % 2)))});
        }
    }
}

// 2^x; 0 for x = -inf.
__device__ __forceinline__ float exp2_f32(float x) { return exp2f(x); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ double warp_max_f64(double v) {
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Element offset of row [i0, i1, i2, :] of a tensor.
__device__ __forceinline__ long long row_offset(const EkTensor& t, long long i0, long long i1, long long i2) {
    return i0 * t.stride[0] + i1 * t.stride[1] + i2 * t.stride[2];
}

template <typename T> __device__ __forceinline__ const T* tensor_ptr(const EkTensor& t) {
    return reinterpret_cast<const T*>(t.ptr);
}
template <typename T> __device__ __forceinline__ T* tensor_mut(const EkTensor& t) { return reinterpret_cast<T*>(t.ptr); }

// A very negative but finite reference: keeps exp2(-inf - m) at 0 without NaN.
#define EK_NEG_BIG (-3.0e38f)
// -inf without math.h.
#define EK_NEG_INF (__int_as_float(0xff800000))
#define EK_NEG_INF_F64 (__longlong_as_double(0xfff0000000000000ll))

// The planning's decision arithmetic, the device twin of src/numerics.rs (read that first): the
// same operations in the same order, each one rounded on its own. Every multiply and add is a
// round-to-nearest intrinsic (`__dmul_rn`, `__dadd_rn`, …), which nvcc/NVRTC never fuse into an
// FMA (CUDA C++ Programming Guide, "Intrinsic Functions"); the host emulator maps them to plain
// operations built with -ffp-contract=off. The one fused operation is ek_dot32's `__fmaf_rn`
// (numerics::dot32, the logits of 16-bit inputs), fused by definition on both sides. tests/cuda_compile.rs checks the planning kernels' PTX
// for fma.f64 and calls into libdevice; tests/cuda_emu.rs compares device and CPU plans bit for bit.

#pragma once

#define EK_LANES 256  // numerics::LANES: the planning kernels' block size

// numerics::dot: partials acc[i % 8] over whole chunks of eight, summed in order onto 0, then the tail.
__device__ __forceinline__ double ek_dot(const double* a, const double* b, int n) {
    double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    const int whole = n - n % 8;
    for (int x = 0; x < whole; x += 8)
#pragma unroll
        for (int i = 0; i < 8; i++) acc[i] = __dadd_rn(acc[i], __dmul_rn(a[x + i], b[x + i]));
    double sum = 0.0;
#pragma unroll
    for (int i = 0; i < 8; i++) sum = __dadd_rn(sum, acc[i]);
    for (int x = whole; x < n; x++) sum = __dadd_rn(sum, __dmul_rn(a[x], b[x]));
    return sum;
}

// numerics::dot32 (the logits of 16-bit inputs): acc = fma(a[i], b[i], acc) in order from 0, each
// step one IEEE fused multiply-add (`__fmaf_rn`, fma.rn.f32: the bits of f32::mul_add and x86's vfmadd).
__device__ __forceinline__ float ek_dot32(const float* a, const float* b, int n) {
    float acc = 0.0f;
    for (int x = 0; x < n; x++) acc = __fmaf_rn(a[x], b[x], acc);
    return acc;
}

// numerics::lane_sum: `v` is this thread's lane sum (terms t, t + 256, … added onto 0 in order);
// the halving tree over the block's EK_LANES threads, through `red` (EK_LANES doubles of shared
// memory). Every thread gets the total. blockDim.x must be EK_LANES.
__device__ double ek_lane_sum(double v, double* red) {
    red[threadIdx.x] = v;
    for (int stride = EK_LANES / 2; stride > 0; stride >>= 1) {
        __syncthreads();
        if ((int)threadIdx.x < stride) red[threadIdx.x] = __dadd_rn(red[threadIdx.x], red[threadIdx.x + stride]);
    }
    __syncthreads();
    const double total = red[0];
    __syncthreads();  // red may be reused by the caller's next reduction
    return total;
}

#define EK_LN2_HI 0.6931471803691238          // bits 0x3FE62E42FEE00000: k·LN2_HI exact for |k| < 2^20
#define EK_LN2_LO 1.9082149292705877e-10
#define EK_INV_LN2 1.4426950408889634
#define EK_EXP_MAX 709.782712893384
#define EK_EXP_MIN (-745.1332191019412)
#define EK_SQRT2 1.4142135623730951

__device__ __forceinline__ double ek_pow2(long long k) { return __longlong_as_double((k + 1023) << 52); }

// numerics::exp: Cody–Waite reduction, Taylor's series to r^13 in Horner form, 2^k by bits.
__device__ double ek_exp(double x) {
    if (x != x) return x;
    if (x > EK_EXP_MAX) return __longlong_as_double(0x7ff0000000000000ll);
    if (x < EK_EXP_MIN) return 0.0;
    const double k = floor(__dadd_rn(__dmul_rn(x, EK_INV_LN2), 0.5));
    const double r = __dsub_rn(__dsub_rn(x, __dmul_rn(k, EK_LN2_HI)), __dmul_rn(k, EK_LN2_LO));
    const double taylor[12] = {1.6059043836821613e-10, 2.08767569878681e-09, 2.505210838544172e-08,
                               2.755731922398589e-07,  2.7557319223985893e-06, 2.48015873015873e-05,
                               0.0001984126984126984,  0.001388888888888889,   0.008333333333333333,
                               0.041666666666666664,   0.16666666666666666,    0.5};
    double p = taylor[0];
#pragma unroll
    for (int i = 1; i < 12; i++) p = __dadd_rn(__dmul_rn(p, r), taylor[i]);
    p = __dadd_rn(__dmul_rn(p, r), 1.0);
    p = __dadd_rn(__dmul_rn(p, r), 1.0);
    const long long ki = (long long)k;
    if (ki < -1022) return __dmul_rn(__dmul_rn(p, ek_pow2(ki + 54)), ek_pow2(-54));
    if (ki > 1023) return __dmul_rn(__dmul_rn(p, ek_pow2(ki - 1)), 2.0);
    return __dmul_rn(p, ek_pow2(ki));
}

// numerics::ln: x = m·2^e, √2/2 ≤ m < √2, ln m = 2·atanh((m-1)/(m+1)) by its series.
__device__ double ek_ln(double x) {
    if (x != x || x < 0.0) return __longlong_as_double(0x7ff8000000000000ll);
    if (x == 0.0) return __longlong_as_double(0xfff0000000000000ll);
    if (x == __longlong_as_double(0x7ff0000000000000ll)) return x;
    long long e = 0;
    if (x < 2.2250738585072014e-308) {  // subnormal: scale into the normal range
        x = __dmul_rn(x, ek_pow2(54));
        e = -54;
    }
    const long long bits = __double_as_longlong(x);
    e += ((bits >> 52) & 0x7ff) - 1023;
    double m = __longlong_as_double((bits & 0x000fffffffffffffll) | 0x3ff0000000000000ll);
    if (m > EK_SQRT2) {
        m = __dmul_rn(m, 0.5);
        e += 1;
    }
    const double f = __dsub_rn(m, 1.0);
    const double s = __ddiv_rn(f, __dadd_rn(2.0, f));
    const double z = __dmul_rn(s, s);
    const double series[11] = {0.043478260869565216, 0.047619047619047616, 0.05263157894736842, 0.058823529411764705,
                               0.06666666666666667,  0.07692307692307693,  0.09090909090909091, 0.1111111111111111,
                               0.14285714285714285,  0.2,                  0.3333333333333333};
    double p = series[0];
#pragma unroll
    for (int i = 1; i < 11; i++) p = __dadd_rn(__dmul_rn(p, z), series[i]);
    const double ln_m = __dadd_rn(__dmul_rn(2.0, s), __dmul_rn(__dmul_rn(2.0, s), __dmul_rn(z, p)));
    const double ed = (double)e;
    return __dadd_rn(__dmul_rn(ed, EK_LN2_HI), __dadd_rn(__dmul_rn(ed, EK_LN2_LO), ln_m));
}

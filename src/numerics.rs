//! The planning's decision arithmetic, defined operation by operation so that every backend
//! computes the same bits (SPEC §6: identical decisions, ties included).
//!
//! Planning decides with f64 logits, softmax and entropy. Those values depend on how sums are
//! ordered and on `exp`/`ln`, which differ between libms (glibc, CUDA's libdevice) and between
//! summation orders (SIMD partial sums, thread-block trees). Here each is pinned down:
//! - [`dot`]: eight interleaved partial sums, then the partials in order, then the tail;
//! - [`lane_sum`]: 256 strided partial sums, then a halving tree (the thread-block reduction
//!   the device kernels run with 256 threads);
//! - [`exp`], [`ln`]: range reduction and polynomials in plain IEEE operations, no fused
//!   multiply-add.
//!
//! Logits of 16-bit inputs are the exception ([`LogitPrecision`]): their representatives carry 8
//! or 11 significant bits, so planning takes their dot products in f32 — [`dot32`], a chain of
//! fused multiply-adds in dim order, which every IEEE FMA (x86's, CUDA's `__fmaf_rn`) rounds the
//! same way — at twice the lanes of f64 per instruction. Everything after the dot products stays
//! f64.
//!
//! `cuda/numerics.cuh` is the device twin, written with round-to-nearest intrinsics
//! (`__dmul_rn`, `__dadd_rn`, …) that the compiler never contracts into FMAs. Rust never contracts
//! either, so both sides round every operation the same way. (The CPU's logit kernel fuses
//! [`dot`]'s multiply-adds only where every product is exact — then one rounding is the same as
//! two: `cpu/plan_logits.rs`, `products_exact`.) `tests/cuda_emu.rs` compares the
//! device plan with the CPU plan bit for bit; `tests/cuda_compile.rs` checks the compiled PTX of
//! the planning kernels for FMAs and library calls.

/// The order of ranking keys (planning's logits or fused scores, compression's scores): larger
/// first, by IEEE total order with every NaN taken as the negative quiet NaN — below −inf —
/// whatever sign the arithmetic left on it (x86 and NVIDIA GPUs make NaNs of opposite signs);
/// `sortable` in cuda/topk.cuh maps keys the same way.
pub fn rank_cmp(a: f64, b: f64) -> std::cmp::Ordering {
    let canonical = |x: f64| if x.is_nan() { f64::from_bits(0xFFF8_0000_0000_0000) } else { x };
    canonical(b).total_cmp(&canonical(a))
}

/// [`rank_cmp`] as an integer: `rank_key(a) < rank_key(b)` exactly when `a` ranks before `b`
/// (equal keys exactly when they tie).
#[inline]
pub fn rank_key(x: f64) -> u64 {
    let bits = if x.is_nan() { 0xFFF8_0000_0000_0000 } else { x.to_bits() };
    // IEEE total order as unsigned order: negatives' bits reversed, positives' above them.
    let ascending = if bits >> 63 == 1 { !bits } else { bits | 1 << 63 };
    !ascending
}

/// [`rank_cmp`] for f32 keys (`sortable32` in cuda/topk.cuh).
pub fn rank_cmp32(a: f32, b: f32) -> std::cmp::Ordering {
    let canonical = |x: f32| if x.is_nan() { f32::from_bits(0xFFC0_0000) } else { x };
    canonical(b).total_cmp(&canonical(a))
}

/// Partial sums of [`lane_sum`]: the planning kernels' block size (`PLAN_THREADS`).
pub const LANES: usize = 256;

/// `Σ a[i]·b[i]`: partial sums `acc[i % 8]` over the whole chunks of eight, added `acc[0]` to
/// `acc[7]` onto 0, then the tail (the `len % 8` last products) in order.
#[inline(always)]
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum = 0.0;
    for v in acc {
        sum += v;
    }
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// The precision of the planning logits' dot products, fixed by the inputs' dtype: [`dot`] in
/// f64 for f32 inputs (their conformance decisions were made in f32 by the reference; f64 lands on
/// every one of them), [`dot32`] for f16 and bf16 inputs, whose values carry 11 or 8 significant
/// bits: f32's 24 keep the logits far finer than the inputs that made them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitPrecision {
    /// [`dot`] in f64 (f32 inputs).
    F64,
    /// [`dot32`] in f32 (f16 and bf16 inputs).
    F32,
}

impl LogitPrecision {
    /// The precision of the logits of inputs of `dtype`.
    pub fn of(dtype: crate::tensor::DType) -> Self {
        if dtype == crate::tensor::DType::F32 { LogitPrecision::F64 } else { LogitPrecision::F32 }
    }
}

/// `Σ a[i]·b[i]` in f32 for the logits of 16-bit inputs: `acc = fma(a[i], b[i], acc)` for i in
/// order from `acc = 0` — each step one rounding (IEEE fused multiply-add: `f32::mul_add`, x86's
/// `vfmadd`, CUDA's `__fmaf_rn` all give these bits), subnormals kept (no flush-to-zero on any
/// backend). The rows are `qmax + qmin` summed in f64 and rounded to f32 (`as f32`,
/// `cvt.rn.f32.f64`): the f32 sum's bits, as rounding a sum twice is harmless when 53 ≥ 2·24 + 2.
/// Unlike f64, f32 can overflow with extreme bf16 values (sums or products beyond 3.4e38): a row or
/// dot product then becomes ±inf or NaN the same way on every backend, and the logit takes the
/// other representative's dot product (`max` ignores NaN) or ranks last (`rank_key`).
#[inline(always)]
pub fn dot32(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |acc, (&x, &y)| x.mul_add(y, acc))
}

/// `Σ_{j<n} f(j)` in the order of a 256-thread block reduction: lane `t` sums `f(t)`,
/// `f(t + 256)`, … onto 0; then for stride 128, 64, …, 1 lane `t < stride` adds lane
/// `t + stride` to itself; the result is lane 0. Inlined, so it vectorises in the caller's ISA.
#[inline(always)]
pub fn lane_sum(n: usize, f: impl Fn(usize) -> f64) -> f64 {
    let mut lanes = [0f64; LANES];
    for start in (0..n).step_by(LANES) {
        for (t, lane) in lanes.iter_mut().enumerate().take(n - start) {
            *lane += f(start + t);
        }
    }
    let mut stride = LANES / 2;
    while stride > 0 {
        for t in 0..stride {
            lanes[t] += lanes[t + stride];
        }
        stride /= 2;
    }
    lanes[0]
}

/// ln 2 split for exact products `k·LN2_HI` (|k| < 2^20: the high part has 32 trailing zero bits).
pub(crate) const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
pub(crate) const LN2_LO: f64 = 1.9082149292705877e-10;
pub(crate) const INV_LN2: f64 = std::f64::consts::LOG2_E;
/// Beyond these, `exp` overflows to +inf or underflows to 0.
pub(crate) const EXP_MAX: f64 = 709.782712893384;
pub(crate) const EXP_MIN: f64 = -745.1332191019412;
/// 1/n! for n = 13 down to 2: Taylor's series of e^r, |r| ≤ ln2/2, truncated where the next term
/// is below 2^-58.
pub(crate) const EXP_TAYLOR: [f64; 12] = [
    1.6059043836821613e-10,
    2.08767569878681e-9,
    2.505210838544172e-8,
    2.755731922398589e-7,
    2.7557319223985893e-6,
    2.48015873015873e-5,
    0.0001984126984126984,
    0.001388888888888889,
    0.008333333333333333,
    0.041666666666666664,
    0.16666666666666666,
    0.5,
];

/// 2^k for -1022 ≤ k ≤ 1023, by its bits.
#[inline(always)]
fn pow2(k: i64) -> f64 {
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// e^x: x = k·ln2 + r with |r| ≤ ln2/2 (Cody–Waite), e^r by Taylor's series in Horner form,
/// scaled by 2^k in one or two exact-exponent multiplications. Within 2 ulp of the true value;
/// what matters is that `cuda/numerics.cuh` computes the same bits.
#[inline(always)]
pub fn exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x > EXP_MAX {
        return f64::INFINITY;
    }
    if x < EXP_MIN {
        return 0.0;
    }
    let k = (x * INV_LN2 + 0.5).floor();
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let mut p = EXP_TAYLOR[0];
    for c in &EXP_TAYLOR[1..] {
        p = p * r + c;
    }
    p = p * r + 1.0;
    p = p * r + 1.0;
    let k = k as i64;
    if k < -1022 {
        p * pow2(k + 54) * pow2(-54)
    } else if k > 1023 {
        p * pow2(k - 1) * 2.0
    } else {
        p * pow2(k)
    }
}

/// 1/(2n+1) for n = 11 down to 1: the series of atanh, 2·atanh(s) = ln((1+s)/(1-s)), |s| ≤ 0.1716.
const LN_SERIES: [f64; 11] = [
    0.043478260869565216,
    0.047619047619047616,
    0.05263157894736842,
    0.058823529411764705,
    0.06666666666666667,
    0.07692307692307693,
    0.09090909090909091,
    0.1111111111111111,
    0.14285714285714285,
    0.2,
    0.3333333333333333,
];
const SQRT2: f64 = std::f64::consts::SQRT_2;

/// ln x: x = m·2^e with √2/2 ≤ m < √2, ln m = 2·atanh((m-1)/(m+1)) by its series, plus e·ln2 in
/// two parts. Within 2 ulp; NaN for x < 0, -inf at 0.
#[inline(always)]
pub fn ln(x: f64) -> f64 {
    if x.is_nan() || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 {
        return f64::NEG_INFINITY;
    }
    if x == f64::INFINITY {
        return x;
    }
    let (mut x, mut e) = (x, 0i64);
    if x < f64::MIN_POSITIVE {
        x *= pow2(54);
        e = -54;
    }
    let bits = x.to_bits();
    e += ((bits >> 52) & 0x7FF) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000F_FFFF_FFFF_FFFF) | 0x3FF0_0000_0000_0000);
    if m > SQRT2 {
        m *= 0.5;
        e += 1;
    }
    ln_reduced(m, e as f64)
}

/// `ln(m·2^e)` for √2/2 ≤ m < √2: the series of atanh, plus e·ln2 in two parts.
#[inline(always)]
fn ln_reduced(m: f64, e: f64) -> f64 {
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let mut p = LN_SERIES[0];
    for c in &LN_SERIES[1..] {
        p = p * z + c;
    }
    let ln_m = 2.0 * s + 2.0 * s * (z * p);
    e * LN2_HI + (e * LN2_LO + ln_m)
}

/// [`ln`] of eight values, bit for bit, without branches, so the loop vectorises: every lane
/// runs the series, the special values are selected at the end.
#[inline(always)]
pub fn ln_lanes(x: [f64; 8]) -> [f64; 8] {
    let mut out = [0f64; 8];
    for (out, &x) in out.iter_mut().zip(&x) {
        let sub = x < f64::MIN_POSITIVE;
        let xs = if sub { x * pow2(54) } else { x };
        let bits = xs.to_bits();
        let e = ((bits >> 52) & 0x7FF) as i64 - 1023 + if sub { -54 } else { 0 };
        let m = f64::from_bits((bits & 0x000F_FFFF_FFFF_FFFF) | 0x3FF0_0000_0000_0000);
        let big = m > SQRT2;
        let (m, e) = if big { (m * 0.5, e + 1) } else { (m, e) };
        let core = ln_reduced(m, e as f64);
        *out = if x.is_nan() || x < 0.0 {
            f64::NAN
        } else if x == 0.0 {
            f64::NEG_INFINITY
        } else if x == f64::INFINITY {
            x
        } else {
            core
        };
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn nan_keys_rank_last_whatever_their_sign() {
        use std::cmp::Ordering::*;
        let (pos, neg) = (f64::from_bits(0x7FF8_0000_0000_0001), f64::from_bits(0xFFF8_0000_0000_0000));
        for nan in [pos, neg, f64::NAN] {
            assert_eq!(rank_cmp(f64::NEG_INFINITY, nan), Less, "−inf ranks before NaN");
            assert_eq!(rank_cmp(nan, 0.0), Greater);
            assert_eq!(rank_cmp(nan, pos), Equal);
        }
        assert_eq!(rank_cmp(2.0, 1.0), Less, "larger first");
        assert_eq!(rank_cmp32(f32::NAN, f32::NEG_INFINITY), Greater);
        assert_eq!(rank_cmp32(-f32::NAN, f32::NAN), Equal);
    }

    /// The integer keys order every pair of values as `rank_cmp` does, ties included.
    #[test]
    fn rank_keys_order_as_rank_cmp() {
        let mut xs = vec![0.0, -0.0, 1.0, -1.0, 2.0, f64::INFINITY, f64::NEG_INFINITY, f64::MAX, f64::MIN];
        xs.extend([f64::MIN_POSITIVE, -f64::MIN_POSITIVE, f64::from_bits(1), -f64::from_bits(1), 1.0 + f64::EPSILON]);
        xs.extend([f64::NAN, -f64::NAN, f64::from_bits(0x7FF8_0000_0000_0001), f64::from_bits(0xFFF0_0000_0000_0001)]);
        let mut rng = crate::synth::Rng::new(3);
        xs.extend((0..200).map(|_| rng.normal() * 10f64.powi((rng.normal() * 50.0) as i32)));
        for &a in &xs {
            for &b in &xs {
                assert_eq!(rank_key(a).cmp(&rank_key(b)), rank_cmp(a, b), "{a:e} vs {b:e}");
            }
        }
    }

    fn ulps(a: f64, b: f64) -> u64 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs()
    }

    /// Inputs for the lane forms' tests: ordinary, extreme and special values.
    pub(crate) fn lane_test_inputs() -> Vec<f64> {
        let mut rng = crate::synth::Rng::new(17);
        let mut xs: Vec<f64> = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            1e-9,
            1.0 + 1e-9,
            f64::MIN_POSITIVE,
            4.9e-324,
            1e-310,
            f64::MAX,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            -f64::NAN,
            EXP_MAX,
            EXP_MIN,
            EXP_MAX + 1e-9,
            EXP_MIN - 1e-9,
            709.0,
            -708.5,
            -740.0,
            -745.0,
            0.5 * std::f64::consts::LN_2,
            SQRT2,
            SQRT2 * (1.0 + f64::EPSILON),
            0.5,
            2.0,
        ];
        for _ in 0..40_000 {
            let u = rng.uniform();
            xs.push((rng.normal() * 300.0).clamp(-800.0, 800.0));
            xs.push(u);
            xs.push(u * 1e-300);
            xs.push((u * 1400.0 - 700.0).exp());
        }
        while !xs.len().is_multiple_of(8) {
            xs.push(1.0);
        }
        xs
    }

    /// The lane form of `ln` computes the scalar form's bits.
    #[test]
    fn ln_lanes_is_ln_bit_for_bit() {
        for chunk in lane_test_inputs().chunks(8) {
            let x: [f64; 8] = chunk.try_into().unwrap();
            let l = ln_lanes(x);
            for i in 0..8 {
                let lw = ln(x[i]);
                assert!(l[i].to_bits() == lw.to_bits() || (l[i].is_nan() && lw.is_nan()), "ln({:e})", x[i]);
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_std() {
        let mut worst = 0;
        for i in 0..200_000 {
            let x = -745.0 + 1454.0 * (i as f64 / 200_000.0);
            let (got, want) = (exp(x), x.exp());
            if want.is_normal() {
                worst = worst.max(ulps(got, want));
            }
        }
        // The planning's range: softmax exponents in [-50, 0].
        for i in 0..200_000 {
            let x = -50.0 * (i as f64 / 200_000.0);
            worst = worst.max(ulps(exp(x), x.exp()));
        }
        assert!(worst <= 2, "exp: {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp(f64::INFINITY), f64::INFINITY);
        assert!(exp(f64::NAN).is_nan());
        assert!(exp(-720.0) > 0.0 && exp(-720.0) < f64::MIN_POSITIVE, "subnormal results");
        assert!((exp(-720.0) / (-720.0f64).exp() - 1.0).abs() < 1e-9);
        assert!(exp(709.7).is_finite() && exp(710.0).is_infinite());
    }

    #[test]
    fn ln_is_within_two_ulp_of_std() {
        let mut worst = 0;
        for i in 1..400_000 {
            // 1e-12 .. 1e12 logarithmically, and the entropy's range (p + 1e-9, p ≤ 1) densely.
            let x = 10f64.powf(-12.0 + 24.0 * (i as f64 / 400_000.0));
            let y = 1e-9 + i as f64 / 400_000.0;
            for v in [x, y] {
                worst = worst.max(ulps(ln(v), v.ln()));
            }
        }
        assert!(worst <= 2, "ln: {worst} ulp");
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(ln(0.0), f64::NEG_INFINITY);
        assert!(ln(-1.0).is_nan() && ln(f64::NAN).is_nan());
        assert_eq!(ln(f64::INFINITY), f64::INFINITY);
        assert!(ulps(ln(5e-324), (5e-324f64).ln()) <= 2, "subnormal arguments");
    }

    #[test]
    fn lane_sum_is_the_block_reduction_order() {
        // Lane sums then a halving tree: for 300 values, lanes 0..44 hold two terms.
        let v: Vec<f64> = (0..300).map(|i| 1.0 / (1.0 + i as f64)).collect();
        let mut lanes = [0f64; LANES];
        for (j, x) in v.iter().enumerate() {
            lanes[j % LANES] += x;
        }
        for stride in [128, 64, 32, 16, 8, 4, 2, 1] {
            for t in 0..stride {
                lanes[t] += lanes[t + stride];
            }
        }
        assert_eq!(lane_sum(v.len(), |j| v[j]).to_bits(), lanes[0].to_bits());
        assert_eq!(lane_sum(0, |_| 1.0), 0.0);
    }

    #[test]
    fn dot_orders_partials_then_tail() {
        let a: Vec<f64> = (0..19).map(|i| 0.1 * i as f64 - 0.7).collect();
        let b: Vec<f64> = (0..19).map(|i| 1.0 / (3.0 + i as f64)).collect();
        let mut acc = [0f64; 8];
        for i in 0..16 {
            acc[i % 8] += a[i] * b[i];
        }
        let mut want = 0.0;
        for x in acc {
            want += x;
        }
        for i in 16..19 {
            want += a[i] * b[i];
        }
        assert_eq!(dot(&a, &b).to_bits(), want.to_bits());
    }
}

//! Eight f64 lanes for the planning logits: multiplies and adds each rounded on its own (the
//! decisions' arithmetic is `numerics`', which the device kernels share bit for bit); fused only
//! where the product is exact, so that one rounding is the same as two.
//! One implementation per [`super::simd::Simd`] ISA, chosen by its `F64x8` type.

use crate::numerics;

/// Eight f64 lanes. `unsafe` like [`super::simd::Simd`]: the ISA must be present (guaranteed by
/// `dispatch`) and pointers valid for eight f64s.
pub(crate) trait F64x8: Copy {
    /// Query rows per planning micro-kernel call on this ISA: its 2·`ROWS` accumulators, two key
    /// vectors and a broadcast fit the vector registers.
    const ROWS: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f64) -> Self;
    unsafe fn load(p: *const f64) -> Self;
    /// Eight f32s, widened (exactly).
    unsafe fn load_f32(p: *const f32) -> Self;
    unsafe fn store(p: *mut f64, v: Self);
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn mul(a: Self, b: Self) -> Self;
    /// `a·b + c`, for products the caller knows are exact: then fused or not, the same bits.
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self;
    /// Lane-wise `a / b` (IEEE division: the scalar's bits; lane by lane unless overridden).
    #[inline(always)]
    unsafe fn div(a: Self, b: Self) -> Self {
        unsafe { Self::lane_wise(a, b, |x, y| x / y) }
    }
    /// Lane-wise `f64::max(a, b)`: the larger, a NaN lane taking the other operand (a zero of
    /// either sign where both are zeros).
    #[inline(always)]
    unsafe fn max_num(a: Self, b: Self) -> Self {
        unsafe { Self::lane_wise(a, b, f64::max) }
    }
    /// `f` of each pair of lanes, through memory.
    #[inline(always)]
    unsafe fn lane_wise(a: Self, b: Self, f: impl Fn(f64, f64) -> f64) -> Self {
        unsafe {
            let (mut x, mut y) = ([0f64; 8], [0f64; 8]);
            Self::store(x.as_mut_ptr(), a);
            Self::store(y.as_mut_ptr(), b);
            for (x, y) in x.iter_mut().zip(y) {
                *x = f(*x, y);
            }
            Self::load(x.as_ptr())
        }
    }
    /// `numerics::exp` of each lane, bit for bit (lane by lane unless the ISA has a vector form).
    #[inline(always)]
    unsafe fn exp(x: Self) -> Self {
        unsafe {
            let mut v = [0f64; 8];
            Self::store(v.as_mut_ptr(), x);
            for v in &mut v {
                *v = numerics::exp(*v);
            }
            Self::load(v.as_ptr())
        }
    }
}

/// The most rows any ISA's micro-kernel takes (its accumulator arrays' size).
pub(crate) const MAX_ROWS: usize = 12;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::F64x8;
    use crate::numerics::{EXP_MAX, EXP_MIN, EXP_TAYLOR, INV_LN2, LN2_HI, LN2_LO};
    use std::arch::x86_64::*;

    /// One zmm: 12 rows × (max, min) = 24 of the 32 registers.
    impl F64x8 for __m512d {
        const ROWS: usize = 12;
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { _mm512_setzero_pd() }
        }
        #[inline(always)]
        unsafe fn splat(x: f64) -> Self {
            unsafe { _mm512_set1_pd(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f64) -> Self {
            unsafe { _mm512_loadu_pd(p) }
        }
        #[inline(always)]
        unsafe fn load_f32(p: *const f32) -> Self {
            unsafe { _mm512_cvtps_pd(_mm256_loadu_ps(p)) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f64, v: Self) {
            unsafe { _mm512_storeu_pd(p, v) }
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            unsafe { _mm512_add_pd(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            unsafe { _mm512_mul_pd(a, b) }
        }
        #[inline(always)]
        unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
            unsafe { _mm512_fmadd_pd(a, b, c) }
        }
        #[inline(always)]
        unsafe fn div(a: Self, b: Self) -> Self {
            unsafe { _mm512_div_pd(a, b) }
        }
        /// `vmaxpd` returns its second operand where either is NaN: where `b` is, take `a`.
        #[inline(always)]
        unsafe fn max_num(a: Self, b: Self) -> Self {
            unsafe { _mm512_mask_blend_pd(_mm512_cmp_pd_mask::<_CMP_UNORD_Q>(b, b), _mm512_max_pd(a, b), a) }
        }
        /// `numerics::exp` step by step on eight lanes: a lane outside the finite range (NaN
        /// included) computes e^0 and is selected at the end (a clamped input would compute a
        /// subnormal: a microcode assist per operation); the scaling `p·2^(k+o)·2^(−o)` builds
        /// `2^(k+o)` from the bits of `k + o + 2^52 + 1023` (k ∈ [−1075, 1024], so the biased
        /// exponent k + o + 1023 ∈ [2, 2046]) — every rounding as the scalar form's.
        #[inline(always)]
        unsafe fn exp(x: Self) -> Self {
            unsafe {
                let set = _mm512_set1_pd;
                let finite = _mm512_cmp_pd_mask::<_CMP_GE_OQ>(x, set(EXP_MIN))
                    & _mm512_cmp_pd_mask::<_CMP_LE_OQ>(x, set(EXP_MAX));
                let xc = _mm512_maskz_mov_pd(finite, x);
                // floor (round down, no precision exception)
                let k = _mm512_roundscale_pd::<0x09>(_mm512_add_pd(_mm512_mul_pd(xc, set(INV_LN2)), set(0.5)));
                let r = _mm512_sub_pd(_mm512_sub_pd(xc, _mm512_mul_pd(k, set(LN2_HI))), _mm512_mul_pd(k, set(LN2_LO)));
                let mut p = set(EXP_TAYLOR[0]);
                for &c in &EXP_TAYLOR[1..] {
                    p = _mm512_add_pd(_mm512_mul_pd(p, r), set(c));
                }
                p = _mm512_add_pd(_mm512_mul_pd(p, r), set(1.0));
                p = _mm512_add_pd(_mm512_mul_pd(p, r), set(1.0));
                let low = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(k, set(-1022.0));
                let high = _mm512_cmp_pd_mask::<_CMP_GT_OQ>(k, set(1023.0));
                let o = _mm512_mask_mov_pd(_mm512_maskz_mov_pd(high, set(-1.0)), low, set(54.0));
                let scale = _mm512_mask_mov_pd(_mm512_mask_mov_pd(set(1.0), high, set(2.0)), low, set(2f64.powi(-54)));
                let biased = _mm512_add_pd(_mm512_add_pd(k, o), set(4_503_599_627_370_496.0 + 1023.0));
                let pow2 = _mm512_castsi512_pd(_mm512_slli_epi64::<52>(_mm512_castpd_si512(biased)));
                let core = _mm512_mul_pd(_mm512_mul_pd(p, pow2), scale);
                let over = _mm512_cmp_pd_mask::<_CMP_GT_OQ>(x, set(EXP_MAX));
                let under = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(x, set(EXP_MIN));
                let nan = _mm512_cmp_pd_mask::<_CMP_UNORD_Q>(x, x);
                let out = _mm512_mask_mov_pd(core, over, set(f64::INFINITY));
                let out = _mm512_mask_mov_pd(out, under, _mm512_setzero_pd());
                _mm512_mask_mov_pd(out, nan, x)
            }
        }
    }

    /// Two ymm: 2 rows × (max, min) × 2 = 8 of the 16 registers, the key halves 4 more.
    #[derive(Clone, Copy)]
    pub(crate) struct Ymm2([__m256d; 2]);

    impl F64x8 for Ymm2 {
        const ROWS: usize = 2;
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { Ymm2([_mm256_setzero_pd(); 2]) }
        }
        #[inline(always)]
        unsafe fn splat(x: f64) -> Self {
            unsafe { Ymm2([_mm256_set1_pd(x); 2]) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f64) -> Self {
            unsafe { Ymm2([_mm256_loadu_pd(p), _mm256_loadu_pd(p.add(4))]) }
        }
        #[inline(always)]
        unsafe fn load_f32(p: *const f32) -> Self {
            unsafe { Ymm2([_mm256_cvtps_pd(_mm_loadu_ps(p)), _mm256_cvtps_pd(_mm_loadu_ps(p.add(4)))]) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f64, v: Self) {
            unsafe {
                _mm256_storeu_pd(p, v.0[0]);
                _mm256_storeu_pd(p.add(4), v.0[1]);
            }
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            unsafe { Ymm2([_mm256_add_pd(a.0[0], b.0[0]), _mm256_add_pd(a.0[1], b.0[1])]) }
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            unsafe { Ymm2([_mm256_mul_pd(a.0[0], b.0[0]), _mm256_mul_pd(a.0[1], b.0[1])]) }
        }
        #[inline(always)]
        unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
            unsafe { Ymm2([_mm256_fmadd_pd(a.0[0], b.0[0], c.0[0]), _mm256_fmadd_pd(a.0[1], b.0[1], c.0[1])]) }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::Ymm2;

/// Portable: an array; the compiler vectorises what it can.
impl F64x8 for [f64; 8] {
    const ROWS: usize = 4;
    #[inline(always)]
    unsafe fn zero() -> Self {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn splat(x: f64) -> Self {
        [x; 8]
    }
    #[inline(always)]
    unsafe fn load(p: *const f64) -> Self {
        unsafe { p.cast::<[f64; 8]>().read_unaligned() }
    }
    #[inline(always)]
    unsafe fn load_f32(p: *const f32) -> Self {
        unsafe { p.cast::<[f32; 8]>().read_unaligned().map(f64::from) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f64, v: Self) {
        unsafe { p.cast::<[f64; 8]>().write_unaligned(v) }
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        std::array::from_fn(|i| a[i] * b[i])
    }
    /// Not fused (no FMA assumed): the same bits for the exact products it is called with.
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::tests::lane_test_inputs;

    fn exp_is_numerics_exp<V: F64x8>(isa: &str) {
        for chunk in lane_test_inputs().chunks(8) {
            let mut got = [0f64; 8];
            // SAFETY: the caller checked the ISA; both arrays hold eight f64s.
            unsafe { V::store(got.as_mut_ptr(), V::exp(V::load(chunk.as_ptr()))) };
            for (x, g) in chunk.iter().zip(got) {
                let want = numerics::exp(*x);
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "{isa}: exp({x:e}) = {g:e}, not {want:e}"
                );
            }
        }
    }

    /// Every ISA's `exp` computes `numerics::exp`'s bits (a path this CPU lacks says so).
    #[test]
    fn exp_lanes_are_numerics_exp_bit_for_bit() {
        exp_is_numerics_exp::<[f64; 8]>("portable");
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                exp_is_numerics_exp::<Ymm2>("avx2");
            } else {
                eprintln!("SKIP avx2: this CPU lacks it");
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq") {
                exp_is_numerics_exp::<std::arch::x86_64::__m512d>("avx512");
            } else {
                eprintln!("SKIP avx512: this CPU lacks it");
            }
        }
    }

    /// `max_num` and `div` lane by lane against `f64::max` and `/`, NaNs on either side included
    /// (pairs of zeros excepted: `f64::max` may return either sign).
    fn max_div_are_scalar<V: F64x8>(isa: &str) {
        let xs = [1.5, -2.0, f64::NAN, f64::INFINITY, -f64::INFINITY, 3e-310, -0.25, 7.0];
        for shift in 0..8 {
            let ys: Vec<f64> = (0..8).map(|i| xs[(i + shift) % 8] * if shift % 2 == 0 { 1.0 } else { -3.0 }).collect();
            let (mut max, mut div) = ([0f64; 8], [0f64; 8]);
            // SAFETY: the caller checked the ISA; every array holds eight f64s.
            unsafe {
                let (a, b) = (V::load(xs.as_ptr()), V::load(ys.as_ptr()));
                V::store(max.as_mut_ptr(), V::max_num(a, b));
                V::store(div.as_mut_ptr(), V::div(a, b));
            }
            for i in 0..8 {
                let same = |g: f64, w: f64| g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan());
                assert!(same(max[i], xs[i].max(ys[i])), "{isa}: max({}, {}) = {}", xs[i], ys[i], max[i]);
                assert!(same(div[i], xs[i] / ys[i]), "{isa}: {} / {} = {}", xs[i], ys[i], div[i]);
            }
        }
    }

    /// Every ISA's `max_num` is `f64::max` and its `div` IEEE division (the f32 logits' epilogue).
    #[test]
    fn max_num_and_div_are_the_scalar_operations() {
        max_div_are_scalar::<[f64; 8]>("portable");
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                max_div_are_scalar::<Ymm2>("avx2");
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq") {
                max_div_are_scalar::<std::arch::x86_64::__m512d>("avx512");
            }
        }
    }
}

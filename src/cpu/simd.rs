//! A minimal SIMD layer: one trait, three implementations (AVX-512, AVX2+FMA, portable).
//!
//! Kernels are generic over [`Simd`] and marked `#[inline(always)]`, so they are compiled inside
//! each ISA's `#[target_feature]` entry point ([`dispatch`]) and the intrinsics inline.

use crate::tensor::Element;

/// f32 vector operations. All functions are `unsafe` because they require the ISA to be present
/// (guaranteed by [`dispatch`]) and, for loads and stores, valid pointers.
pub(crate) trait Simd: Copy + Send + Sync + 'static {
    const LANES: usize;
    type V: Copy;
    /// Eight f64 lanes on this ISA (the planning logits).
    type F64x8: super::simd_f64::F64x8;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    /// Loads `n < LANES` values, the rest zero.
    unsafe fn load_partial(p: *const f32, n: usize) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// Stores the first `n < LANES` lanes.
    unsafe fn store_partial(p: *mut f32, v: Self::V, n: usize);
    /// `a * b + c`.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a * b + c` rounded once (IEEE fused multiply-add), where bits must match other backends
    /// (`numerics::dot32`): [`Simd::fma`] wherever that is fused, as on AVX2 and AVX-512.
    #[inline(always)]
    unsafe fn fused(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        unsafe { Self::fma(a, b, c) }
    }
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise `a > b ? a : b` (`b` where either is NaN).
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise `a < b ? a : b` (`b` where either is NaN).
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
    /// The 8 × 8 block at `src` (rows `ld` apart) transposed: `dst[c][r] = src[r·ld + c]`.
    #[inline(always)]
    unsafe fn transpose8(src: *const f32, ld: usize, dst: &mut [[f32; 8]; 8]) {
        for (c, col) in dst.iter_mut().enumerate() {
            for (r, x) in col.iter_mut().enumerate() {
                // SAFETY: the caller hands eight readable rows of eight values.
                *x = unsafe { *src.add(r * ld + c) };
            }
        }
    }
    /// `2^x`, relative error below 2e-7; exactly 0 for `x < -126` (including `-inf`).
    unsafe fn exp2(x: Self::V) -> Self::V;
    /// `2^x` for `x ≤ 0` or `−∞` (softmax weights, rescale factors): [`Simd::exp2`] unless the
    /// ISA has a cheaper form of the same accuracy class (relative error ≤ 2.4e-7).
    #[inline(always)]
    unsafe fn exp2_nonpositive(x: Self::V) -> Self::V {
        unsafe { Self::exp2(x) }
    }
    unsafe fn hsum(v: Self::V) -> f32;
    /// `src` widened into `dst[..src.len()]` (exact): vector conversions where the ISA has
    /// them, so 16-bit rows cost a few instructions per tile, not a call per element.
    #[inline(always)]
    unsafe fn widen<E: Element>(src: &[E], dst: &mut [f32]) {
        E::widen(src, &mut dst[..src.len()])
    }
    /// `LANES` elements at `p` widened into a vector (exact), without a trip through memory
    /// where the ISA converts in registers.
    #[inline(always)]
    unsafe fn load_widen<E: Element>(p: *const E) -> Self::V {
        let mut lanes = [0f32; 16];
        // SAFETY: the caller hands LANES ≤ 16 readable elements.
        unsafe {
            E::widen(std::slice::from_raw_parts(p, Self::LANES), &mut lanes[..Self::LANES]);
            Self::load(lanes.as_ptr())
        }
    }
}

/// `src` widened into `dst[..src.len()]` a vector at a time by [`Simd::load_widen`], the tail
/// one by one: the ISAs' `widen`, so each conversion is written once, in `load_widen`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn widen_by_vectors<S: Simd, E: Element>(src: &[E], dst: &mut [f32]) {
    let n = src.len();
    assert!(dst.len() >= n, "room for the widened elements");
    let whole = n / S::LANES * S::LANES;
    for i in (0..whole).step_by(S::LANES) {
        // SAFETY: i + LANES ≤ n elements of `src` and of `dst`; the ISA is the caller's.
        unsafe { S::store(dst.as_mut_ptr().add(i), S::load_widen(src.as_ptr().add(i))) };
    }
    for i in whole..n {
        dst[i] = src[i].to_f32();
    }
}

/// Near-minimax coefficients of 2^f on [0, 1], degree 5 (relative error 1.6e-7 evaluated in
/// f32, about one ulp). Fitted by iteratively reweighted least squares on Chebyshev nodes.
const EXP2_NONPOSITIVE_C: [f32; 6] =
    [0.999_999_94, 0.693_153_1, 0.240_153_61, 0.055_826_318, 0.008_989_341, 0.001_877_576_7];

/// Taylor coefficients of `2^f = e^(f ln 2)` on `[-0.5, 0.5]`, degree 7 (error < 6e-9).
const EXP2_C: [f32; 8] = [
    1.0,
    std::f32::consts::LN_2,
    0.240_226_5,
    0.055_504_11,
    0.009_618_129,
    0.001_333_355_8,
    0.000_154_035_3,
    0.000_015_252_734,
];

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{EXP2_C, EXP2_NONPOSITIVE_C, Element, Simd};
    use crate::tensor::DType;
    use std::arch::x86_64::*;

    /// [`Simd::transpose8`] in 256-bit registers: pairs of rows interleaved, then pairs of
    /// pairs, then the 128-bit halves exchanged (24 shuffles for 64 values).
    #[inline(always)]
    unsafe fn transpose8_avx(src: *const f32, ld: usize, dst: &mut [[f32; 8]; 8]) {
        unsafe {
            let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * ld)));
            let lo = |a, b| _mm256_unpacklo_ps(a, b);
            let hi = |a, b| _mm256_unpackhi_ps(a, b);
            let t = [lo(r[0], r[1]), hi(r[0], r[1]), lo(r[2], r[3]), hi(r[2], r[3])];
            let u = [lo(r[4], r[5]), hi(r[4], r[5]), lo(r[6], r[7]), hi(r[6], r[7])];
            let even = |a, b| _mm256_shuffle_ps::<0x44>(a, b);
            let odd = |a, b| _mm256_shuffle_ps::<0xEE>(a, b);
            let t = [even(t[0], t[2]), odd(t[0], t[2]), even(t[1], t[3]), odd(t[1], t[3])];
            let u = [even(u[0], u[2]), odd(u[0], u[2]), even(u[1], u[3]), odd(u[1], u[3])];
            for i in 0..4 {
                _mm256_storeu_ps(dst[i].as_mut_ptr(), _mm256_permute2f128_ps::<0x20>(t[i], u[i]));
                _mm256_storeu_ps(dst[i + 4].as_mut_ptr(), _mm256_permute2f128_ps::<0x31>(t[i], u[i]));
            }
        }
    }

    #[derive(Clone, Copy)]
    pub(crate) struct Avx512;

    impl Simd for Avx512 {
        const LANES: usize = 16;
        type V = __m512;
        type F64x8 = __m512d;
        #[inline(always)]
        unsafe fn widen<E: Element>(src: &[E], dst: &mut [f32]) {
            // SAFETY: this ISA is the caller's (`dispatch`).
            unsafe {
                match E::DTYPE {
                    DType::F32 => E::widen(src, &mut dst[..src.len()]),
                    DType::F16 | DType::BF16 => super::widen_by_vectors::<Self, E>(src, dst),
                }
            }
        }
        #[inline(always)]
        unsafe fn load_widen<E: Element>(p: *const E) -> __m512 {
            // SAFETY: the caller hands 16 readable elements.
            unsafe {
                match E::DTYPE {
                    DType::F32 => _mm512_loadu_ps(p as *const f32),
                    DType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
                    DType::BF16 => {
                        let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
                        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w))
                    }
                }
            }
        }
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_partial(p: *const f32, n: usize) -> __m512 {
            unsafe { _mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn store_partial(p: *mut f32, v: __m512, n: usize) {
            unsafe { _mm512_mask_storeu_ps(p, ((1u32 << n) - 1) as u16, v) }
        }
        #[inline(always)]
        unsafe fn transpose8(src: *const f32, ld: usize, dst: &mut [[f32; 8]; 8]) {
            unsafe { transpose8_avx(src, ld, dst) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn min(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_min_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn exp2(x: __m512) -> __m512 {
            unsafe {
                let tiny = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(-126.0));
                let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-126.0)), _mm512_set1_ps(127.0));
                let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
                let f = _mm512_sub_ps(x, n);
                let mut p = _mm512_set1_ps(EXP2_C[7]);
                for c in EXP2_C[..7].iter().rev() {
                    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
                }
                _mm512_maskz_mov_ps(!tiny, _mm512_scalef_ps(p, n))
            }
        }
        /// Degree 5 on `x − ⌊x⌋` (`vreduceps`) and `vscalefps`, which multiplies by 2^⌊x⌋
        /// itself and underflows to 0 however negative the exponent; −∞ needs no clamp (its
        /// reduction is 0, its scale 0): 7 µops, against 10 with a clamp, `vrndscaleps` (2 µops
        /// on Intel) and a subtraction.
        #[inline(always)]
        unsafe fn exp2_nonpositive(x: __m512) -> __m512 {
            unsafe {
                let f = _mm512_reduce_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(x);
                let mut p = _mm512_set1_ps(EXP2_NONPOSITIVE_C[5]);
                for c in EXP2_NONPOSITIVE_C[..5].iter().rev() {
                    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
                }
                _mm512_scalef_ps(p, x)
            }
        }
        #[inline(always)]
        unsafe fn hsum(v: __m512) -> f32 {
            unsafe { _mm512_reduce_add_ps(v) }
        }
    }

    #[derive(Clone, Copy)]
    pub(crate) struct Avx2;

    #[inline(always)]
    unsafe fn mask8(n: usize) -> __m256i {
        unsafe {
            let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), idx)
        }
    }

    impl Simd for Avx2 {
        const LANES: usize = 8;
        type V = __m256;
        type F64x8 = crate::cpu::simd_f64::Ymm2;
        #[inline(always)]
        unsafe fn widen<E: Element>(src: &[E], dst: &mut [f32]) {
            // SAFETY: this ISA is the caller's (`dispatch`).
            unsafe {
                match E::DTYPE {
                    DType::F32 => E::widen(src, &mut dst[..src.len()]),
                    DType::F16 | DType::BF16 => super::widen_by_vectors::<Self, E>(src, dst),
                }
            }
        }
        #[inline(always)]
        unsafe fn load_widen<E: Element>(p: *const E) -> __m256 {
            // SAFETY: the caller hands 8 readable elements.
            unsafe {
                match E::DTYPE {
                    DType::F32 => _mm256_loadu_ps(p as *const f32),
                    DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                    DType::BF16 => {
                        let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
                    }
                }
            }
        }
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_partial(p: *const f32, n: usize) -> __m256 {
            unsafe { _mm256_maskload_ps(p, mask8(n)) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn store_partial(p: *mut f32, v: __m256, n: usize) {
            unsafe { _mm256_maskstore_ps(p, mask8(n), v) }
        }
        #[inline(always)]
        unsafe fn transpose8(src: *const f32, ld: usize, dst: &mut [[f32; 8]; 8]) {
            unsafe { transpose8_avx(src, ld, dst) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn min(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_min_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn exp2(x: __m256) -> __m256 {
            unsafe {
                let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-126.0));
                let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-126.0)), _mm256_set1_ps(127.0));
                let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
                let f = _mm256_sub_ps(x, n);
                let mut p = _mm256_set1_ps(EXP2_C[7]);
                for c in EXP2_C[..7].iter().rev() {
                    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(*c));
                }
                // 2^n built in the exponent field; n is in [-126, 127].
                let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
                _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)))
            }
        }
        #[inline(always)]
        unsafe fn hsum(v: __m256) -> f32 {
            unsafe {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
                _mm_cvtss_f32(s)
            }
        }
    }
}

/// Portable fallback: 8 lanes in an array; the compiler vectorises what it can.
#[derive(Clone, Copy)]
pub(crate) struct Portable;

impl Simd for Portable {
    const LANES: usize = 8;
    type V = [f32; 8];
    type F64x8 = [f64; 8];
    #[inline(always)]
    unsafe fn zero() -> [f32; 8] {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> [f32; 8] {
        [x; 8]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [f32; 8] {
        unsafe { std::ptr::read_unaligned(p as *const [f32; 8]) }
    }
    #[inline(always)]
    unsafe fn load_partial(p: *const f32, n: usize) -> [f32; 8] {
        let mut v = [0.0; 8];
        for (i, x) in v.iter_mut().enumerate().take(n) {
            *x = unsafe { *p.add(i) };
        }
        v
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: [f32; 8]) {
        unsafe { std::ptr::write_unaligned(p as *mut [f32; 8], v) }
    }
    #[inline(always)]
    unsafe fn store_partial(p: *mut f32, v: [f32; 8], n: usize) {
        for (i, x) in v.iter().enumerate().take(n) {
            unsafe { *p.add(i) = *x };
        }
    }
    #[inline(always)]
    unsafe fn fma(a: [f32; 8], b: [f32; 8], c: [f32; 8]) -> [f32; 8] {
        // Not `mul_add`: without a hardware FMA in the baseline target it is a libm call.
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn fused(a: [f32; 8], b: [f32; 8], c: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i].mul_add(b[i], c[i]))
    }
    #[inline(always)]
    unsafe fn add(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn sub(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] - b[i])
    }
    #[inline(always)]
    unsafe fn mul(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    unsafe fn max(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| if a[i] > b[i] { a[i] } else { b[i] })
    }
    #[inline(always)]
    unsafe fn min(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| if a[i] < b[i] { a[i] } else { b[i] })
    }
    #[inline(always)]
    unsafe fn exp2(x: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| if x[i] < -126.0 { 0.0 } else { x[i].exp2() })
    }
    #[inline(always)]
    unsafe fn hsum(v: [f32; 8]) -> f32 {
        v.iter().sum()
    }
}

/// Subnormals kept for its lifetime on this thread: clears the x86 MXCSR's flush-to-zero and
/// denormals-are-zero bits (which a host process may have set — `-ffast-math`'s startup code,
/// `torch.set_flush_denormal` — and threads inherit), and restores them on drop. The planning's
/// decisions must round as the other backends do, which keep subnormals (SPEC §6): the f32 logits
/// of 16-bit inputs can be subnormal, and DAZ would also read subnormal inputs as zero. (A no-op
/// under Miri, which runs no inline assembly and no FTZ.)
pub(crate) struct KeepSubnormals {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    saved: u32,
}

#[cfg(all(target_arch = "x86_64", not(miri)))]
const FTZ_DAZ: u32 = 1 << 15 | 1 << 6;

impl KeepSubnormals {
    #[inline(always)]
    pub fn new() -> Self {
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        {
            let saved = mxcsr();
            if saved & FTZ_DAZ != 0 {
                set_mxcsr(saved & !FTZ_DAZ);
            }
            KeepSubnormals { saved }
        }
        #[cfg(not(all(target_arch = "x86_64", not(miri))))]
        KeepSubnormals {}
    }
}

impl Drop for KeepSubnormals {
    #[inline(always)]
    fn drop(&mut self) {
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        if self.saved & FTZ_DAZ != 0 {
            set_mxcsr(self.saved);
        }
    }
}

/// This thread's MXCSR (SSE control and status).
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline(always)]
fn mxcsr() -> u32 {
    let mut csr = 0u32;
    // SAFETY: stores the 32-bit register at a valid, aligned u32 (SSE is x86_64's baseline).
    unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags)) };
    csr
}

/// Sets this thread's MXCSR.
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline(always)]
fn set_mxcsr(csr: u32) {
    // SAFETY: loads from a valid u32; callers only toggle the FTZ/DAZ bits of a value read from
    // the register (no reserved bit set, so no #GP).
    unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags, readonly)) };
}

/// The instruction set the fast CPU kernels run with, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 with AMX-BF16: bf16 attention tiles on AMX (`TDPBF16PS`), everything else AVX-512.
    Amx,
    /// AVX-512 with AVX512-BF16 (no AMX, e.g. AMD Zen 4/5): the same bf16 attention tiles with
    /// their products on `VDPBF16PS`, everything else AVX-512.
    Avx512Bf16,
    /// AVX-512.
    Avx512,
    /// AVX2 with FMA.
    Avx2,
    /// Portable code, no intrinsics.
    Portable,
}

impl Isa {
    /// Every ISA, best first.
    pub const ALL: [Isa; 5] = [Isa::Amx, Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2, Isa::Portable];

    /// The best ISA of this CPU; `ENTROPY_KERNELS_CPU_ISA=avx512|avx2|portable` caps it (for
    /// testing every path; `amx` or unset: no cap; an unknown name caps nothing).
    /// `avx512bf16` is opt-in: only that setting picks it (then AVX-512 where the CPU lacks it).
    /// On the Intel Xeon where it was measured, `VDPBF16PS` issues at the f32 FMA's rate and the
    /// path ran at 0.67× the f32 kernels on widened rows (bf16 dense 8K, D 128); on AMD Zen 4/5
    /// it should double the rate, but no Zen machine has measured it yet.
    pub fn detect() -> Isa {
        let cap = std::env::var("ENTROPY_KERNELS_CPU_ISA").unwrap_or_default().to_ascii_lowercase();
        let start = Isa::ALL.iter().position(|i| i.name() == cap).unwrap_or(0);
        Isa::ALL[start..]
            .iter()
            .copied()
            .filter(|&i| i != Isa::Avx512Bf16 || Isa::ALL[start] == Isa::Avx512Bf16)
            .find(|i| i.supported())
            .unwrap_or(Isa::Portable)
    }

    /// Whether this CPU can run `self` (ignoring any cap from the environment); for `Amx`, also
    /// whether the kernel granted the tile state.
    pub fn supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && Isa::Avx2.supported()
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => Isa::Avx512.supported() && std::arch::is_x86_feature_detected!("avx512bf16"),
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => Isa::Avx512Bf16.supported() && super::amx::sys::usable(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The instruction set's name (as `ENTROPY_KERNELS_CPU_ISA` spells it).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Amx => "amx",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// Whether bf16 attention enters `P·V` with P rounded to bf16 (the AMX / `VDPBF16PS`
    /// tiles), as the GPU's tensor cores do; otherwise every product is f32.
    pub fn bf16_probabilities(self) -> bool {
        matches!(self, Isa::Amx | Isa::Avx512Bf16)
    }
}

/// A kernel generic over the SIMD layer. `with_simd` must be `#[inline(always)]` (as must
/// everything it calls on the hot path) so it compiles inside the ISA's entry point below.
/// No closures on the hot path: a closure is its own function, compiled without the entry
/// point's target features, so the intrinsics inside it become calls (seen: 17× slower).
pub(crate) trait WithSimd {
    type Output;
    fn with_simd<S: Simd>(self) -> Self::Output;
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
unsafe fn run_avx512<K: WithSimd>(k: K) -> K::Output {
    k.with_simd::<x86::Avx512>()
}

/// The AMX and AVX512-BF16 entry: the AVX-512 kernels, plus AVX512-BF16 for the bf16 tiles
/// (conversions, `VDPBF16PS`; AMX itself is `asm!`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c")]
unsafe fn run_avx512_bf16<K: WithSimd>(k: K) -> K::Output {
    k.with_simd::<x86::Avx512>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2<K: WithSimd>(k: K) -> K::Output {
    k.with_simd::<x86::Avx2>()
}

/// Runs `k` with the SIMD type of `isa` (which [`Isa::detect`] found on this CPU).
pub(crate) fn dispatch<K: WithSimd>(isa: Isa, k: K) -> K::Output {
    match isa {
        // SAFETY: `Isa::detect` returned these only after checking the CPU features.
        #[cfg(target_arch = "x86_64")]
        Isa::Amx | Isa::Avx512Bf16 => unsafe { run_avx512_bf16(k) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { run_avx512(k) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { run_avx2(k) },
        _ => k.with_simd::<Portable>(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Element;

    /// `load_widen` of every whole vector of `src`: how many lanes differ from `to_f32` (a NaN
    /// for a NaN, whatever its payload: only max/min, which skip NaNs, read widened rows).
    struct WidenCheck<'a, E>(&'a [E]);

    impl<E: Element> WithSimd for WidenCheck<'_, E> {
        type Output = usize;
        #[inline(always)]
        fn with_simd<S: Simd>(self) -> usize {
            let mut bad = 0;
            for chunk in self.0.chunks_exact(S::LANES) {
                let mut got = [0f32; 16];
                // SAFETY: LANES readable elements, 16 ≥ LANES writable f32s; `dispatch`'s ISA.
                unsafe { S::store(got.as_mut_ptr(), S::load_widen(chunk.as_ptr())) };
                let same = |x: f32, g: f32| x.to_bits() == g.to_bits() || (x.is_nan() && g.is_nan());
                bad += chunk.iter().zip(got).filter(|(x, g)| !same(x.to_f32(), *g)).count();
            }
            bad
        }
    }

    fn check<E: Element>(bits: impl Fn(u32) -> E) {
        // Every 16-bit pattern (f32: a spread of patterns), NaNs, infinities and subnormals included.
        let src: Vec<E> = (0..1u32 << 16).map(|i| bits(i.wrapping_mul(0x9E37_79B9) >> 16 | i)).collect();
        for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
            assert_eq!(dispatch(isa, WidenCheck(&src)), 0, "{} {}", isa.name(), E::DTYPE);
        }
    }

    /// `exp2` and `exp2_nonpositive` of `xs` (a multiple of 16 long) on one ISA.
    struct Exp2Of<'a>(&'a [f32]);

    impl WithSimd for Exp2Of<'_> {
        type Output = (Vec<f32>, Vec<f32>);
        #[inline(always)]
        fn with_simd<S: Simd>(self) -> Self::Output {
            let (mut e, mut en) = (vec![f32::NAN; self.0.len()], vec![f32::NAN; self.0.len()]);
            for (i, x) in self.0.chunks_exact(S::LANES).enumerate() {
                let o = i * S::LANES;
                // SAFETY: LANES values read and written at `o`; `dispatch`'s ISA.
                unsafe {
                    let x = S::load(x.as_ptr());
                    S::store(e.as_mut_ptr().add(o), S::exp2(x));
                    S::store(en.as_mut_ptr().add(o), S::exp2_nonpositive(x));
                }
            }
            (e, en)
        }
    }

    /// Both exponentials keep the error their docs state, on every ISA: relative 2e-7
    /// (`exp2`) and 2.4e-7 (`exp2_nonpositive`, the softmax weights) wherever 2^x is normal;
    /// below that `exp2` is exactly 0 and `exp2_nonpositive` 0 or subnormal; −∞ gives 0.
    /// A dense grid with the edges, and random arguments drawn fresh per run.
    #[test]
    fn exp2_forms_keep_their_documented_error_on_every_isa() {
        let mut rng = crate::synth::Rng::new(crate::synth::test_seed());
        let mut xs: Vec<f32> = (0..=1 << 18).map(|i| -130.0 * i as f32 / (1 << 18) as f32).collect();
        xs.extend((0..1 << 16).map(|_| -(rng.uniform() * 140.0) as f32));
        xs.extend((0..1 << 12).map(|_| -(rng.uniform() * 1e-6) as f32));
        let specials = [0.0, -0.0, -1e-30, -f32::MIN_POSITIVE, -0.5, -1.0, -125.5, -126.0, -149.5, -200.0, -1000.0];
        xs.extend(specials.into_iter().chain([f32::NEG_INFINITY]));
        xs.resize(xs.len().next_multiple_of(16), f32::NEG_INFINITY);
        for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
            let (e, en) = dispatch(isa, Exp2Of(&xs));
            for ((&x, &e), &en) in xs.iter().zip(&e).zip(&en) {
                let want = (x as f64).exp2();
                let normal = x >= -126.0;
                let ok = if normal { (e as f64 / want - 1.0).abs() <= 2e-7 } else { e == 0.0 };
                assert!(ok, "{}: exp2({x:e}) = {e:e}, want {want:e}", isa.name());
                let ok = if normal {
                    (en as f64 / want - 1.0).abs() <= 2.4e-7
                } else {
                    (0.0..f32::MIN_POSITIVE).contains(&en)
                };
                assert!(ok, "{}: exp2_nonpositive({x:e}) = {en:e}, want {want:e}", isa.name());
            }
        }
        for isa in Isa::ALL.into_iter().filter(|i| !i.supported()) {
            eprintln!("SKIP {}: this CPU lacks it", isa.name());
        }
    }

    /// Every ISA's in-register widening is `to_f32`, bit for bit.
    #[test]
    fn load_widen_is_to_f32_on_every_isa() {
        check(|i| half::bf16::from_bits(i as u16));
        check(|i| half::f16::from_bits(i as u16));
        check(|i| f32::from_bits(i.rotate_left(13)));
        for isa in Isa::ALL.into_iter().filter(|i| !i.supported()) {
            eprintln!("SKIP {}: this CPU lacks it", isa.name());
        }
    }
}

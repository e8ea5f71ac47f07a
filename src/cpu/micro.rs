//! Register-blocked microkernels of the transposed FlashAttention tile.
//!
//! The CPU kernels vectorise over *query rows*: Qᵀ is packed `[D][M]`, scores are held as
//! Sᵀ `[keys][M]` and the output as Oᵀ `[D][M]`. Keys and values are then only ever broadcast
//! from their natural `[token][D]` rows, so they are read in place (gathered blocks cost nothing)
//! and the softmax reductions over keys are plain vertical vector operations.
//!
//! `NR` is the register block along keys (Sᵀ) or along D (Oᵀ), `MV` the number of vectors along
//! the rows: `NR·MV` accumulators live in registers.

#![allow(clippy::needless_range_loop)] // register blocks are indexed like the math

use super::simd::Simd;

/// The cache a prefetch fills.
#[derive(Clone, Copy)]
pub(crate) enum Level {
    L1,
    L2,
}

/// Asks for the cache lines of `bytes` bytes at `p` to be brought into `level` (a hint: no
/// effect on results).
#[inline(always)]
pub(crate) fn prefetch(p: *const u8, bytes: usize, level: Level) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..bytes).step_by(64) {
        use std::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1, _mm_prefetch};
        let p = p.wrapping_add(line) as *const i8;
        // SAFETY: prefetching is a hint and never faults, whatever the address.
        unsafe {
            match level {
                Level::L1 => _mm_prefetch::<_MM_HINT_T0>(p),
                Level::L2 => _mm_prefetch::<_MM_HINT_T1>(p),
            }
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes, level);
}

/// `Sᵀ[r][·] = Σ_d k_r[d] · Qᵀ[d][·]` for `NR` keys and `MV·LANES` rows; with `ROW_MAX`, also
/// `rmax[·] = max(rmax[·], max_r Sᵀ[r][·])` while the scores are still in registers (the
/// softmax's max pass then need not read Sᵀ again).
///
/// # Safety
/// `qt` addresses `d` rows of stride `ldq` holding `MV·LANES` values each; every `krows[r]`
/// addresses `d` values; `st` addresses `NR` rows of stride `lds`; with `ROW_MAX`, `rmax`
/// addresses `MV·LANES` values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn qk<S: Simd, const NR: usize, const MV: usize, const ROW_MAX: bool>(
    qt: *const f32,
    ldq: usize,
    krows: &[*const f32; NR],
    d: usize,
    st: *mut f32,
    lds: usize,
    rmax: *mut f32,
) {
    unsafe {
        let mut acc = [[S::zero(); MV]; NR];
        for dd in 0..d {
            let mut qv = [S::zero(); MV];
            for (v, q) in qv.iter_mut().enumerate() {
                *q = S::load(qt.add(dd * ldq + v * S::LANES));
            }
            for r in 0..NR {
                let kb = S::splat(*krows[r].add(dd));
                for v in 0..MV {
                    acc[r][v] = S::fma(kb, qv[v], acc[r][v]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, a) in row.iter().enumerate() {
                S::store(st.add(r * lds + v * S::LANES), *a);
            }
        }
        if ROW_MAX {
            for v in 0..MV {
                let m = acc.iter().fold(S::load(rmax.add(v * S::LANES)), |m, row| S::max(m, row[v]));
                S::store(rmax.add(v * S::LANES), m);
            }
        }
    }
}

/// Rows a [`pv`] call asks into L2 while it runs, one every `every` keys (`bytes` each), so the
/// requests spread over its FMAs instead of queueing for fill buffers in a burst.
#[derive(Clone, Copy)]
pub(crate) struct AskAhead<'a> {
    pub rows: &'a [usize],
    pub bytes: usize,
    pub every: usize,
}

impl AskAhead<'_> {
    pub(crate) const NONE: AskAhead<'static> = AskAhead { rows: &[], bytes: 0, every: usize::MAX };
}

/// `Oᵀ[d0 + r][·] = alpha[·] · Oᵀ[d0 + r][·] + Σ_j v_j[d0 + r] · Pᵀ[j][·]` for `NR` rows of Oᵀ and
/// `MV·LANES` query rows, over `nk` keys.
///
/// Meanwhile the rows of `ahead` are asked into L2 (the next tile's: see `Tile::flush`).
///
/// # Safety
/// `ot` addresses `NR` rows of stride `ldo`; `alpha` `MV·LANES` values; `pt` `nk` rows of stride
/// `ldp`; every `vrows[j]` (j < nk) addresses at least `d0 + NR` values. `ahead.rows` may hold
/// any address (a prefetch never faults).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pv<S: Simd, const NR: usize, const MV: usize>(
    ot: *mut f32,
    ldo: usize,
    alpha: *const f32,
    pt: *const f32,
    ldp: usize,
    vrows: &[*const f32],
    d0: usize,
    ahead: AskAhead<'_>,
) {
    unsafe {
        let mut acc = [[S::zero(); MV]; NR];
        let mut al = [S::zero(); MV];
        for (v, a) in al.iter_mut().enumerate() {
            *a = S::load(alpha.add(v * S::LANES));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, a) in row.iter_mut().enumerate() {
                *a = S::mul(S::load(ot.add(r * ldo + v * S::LANES)), al[v]);
            }
        }
        let (mut due, mut asked) = (0, 0);
        for (j, vr) in vrows.iter().enumerate() {
            if j == due {
                if let Some(&a) = ahead.rows.get(asked) {
                    prefetch(a as *const u8, ahead.bytes, Level::L2);
                    asked += 1;
                }
                due = due.saturating_add(ahead.every);
            }
            let mut pv = [S::zero(); MV];
            for (v, p) in pv.iter_mut().enumerate() {
                *p = S::load(pt.add(j * ldp + v * S::LANES));
            }
            let vr = vr.add(d0);
            for r in 0..NR {
                let vb = S::splat(*vr.add(r));
                for v in 0..MV {
                    acc[r][v] = S::fma(vb, pv[v], acc[r][v]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, a) in row.iter().enumerate() {
                S::store(ot.add(r * ldo + v * S::LANES), *a);
            }
        }
    }
}

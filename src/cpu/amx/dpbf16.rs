//! The tile products of [`super::AmxTile`] on `VDPBF16PS` (AVX512-BF16), for CPUs without AMX
//! (AMD Zen 4/5): the same packed operands and the same result layout as [`super::sys::dp_2x2`],
//! computed with 16-lane f32 accumulators, each `VDPBF16PS` adding two bf16 products per lane.
//!
//! A 2×2 block of 16×16 tiles is 32 rows × 32 columns: eight rows at a time hold 8×2
//! accumulators; each step broadcasts a row's bf16 pair of A (a dword) against a row of the VNNI
//! B tiles (16 columns' pairs).

#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::sys::{TILE_BYTES, TILE_ROW_BYTES, TILE_ROWS};

/// Rows per register block.
const ROWS: usize = 8;

/// [`super::sys::dp_2x2`]'s contract on `VDPBF16PS`: `C[i][j]` at `c[i] + j·64` bytes, row
/// stride `sc`; `A[i]` at `a[i] + s·a_step`, row stride `sa` (32 bf16 per step); `B[j]` at
/// `b + s·b_step + j·1024` (16 rows of 16 pairs).
///
/// # Safety
/// The CPU has AVX512-BF16 and this runs inside an entry point that enables it; every address
/// is valid as for `dp_2x2`.
#[inline(always)]
pub(crate) unsafe fn dp_2x2<const LOAD_C: bool>(
    c: [*mut f32; 2],
    sc: usize,
    a: [*const u16; 2],
    sa: usize,
    a_step: usize,
    b: *const u16,
    b_step: usize,
    steps: usize,
) {
    unsafe {
        for half in 0..2 {
            for r0 in (0..TILE_ROWS).step_by(ROWS) {
                let c_row = |i: usize| (c[half] as *mut u8).add((r0 + i) * sc) as *mut f32;
                let a_row = |i: usize| (a[half] as *const u8).add((r0 + i) * sa);
                let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
                if LOAD_C {
                    for i in 0..ROWS {
                        for j in 0..2 {
                            acc[i][j] = _mm512_loadu_ps(c_row(i).add(16 * j));
                        }
                    }
                }
                for s in 0..steps {
                    let bs = (b as *const u8).add(s * b_step);
                    for p in 0..TILE_ROWS {
                        let b0: __m512bh =
                            std::mem::transmute(_mm512_loadu_si512(bs.add(p * TILE_ROW_BYTES) as *const _));
                        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                            bs.add(TILE_BYTES + p * TILE_ROW_BYTES) as *const _,
                        ));
                        for i in 0..ROWS {
                            let pair = *(a_row(i).add(s * a_step + 4 * p) as *const i32);
                            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
                            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
                        }
                    }
                }
                for i in 0..ROWS {
                    for j in 0..2 {
                        _mm512_storeu_ps(c_row(i).add(16 * j), acc[i][j]);
                    }
                }
            }
        }
    }
}

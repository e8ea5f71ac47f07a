//! Packing keys and values into the AMX operand layouts (AVX-512BW shuffles).
//!
//! - `S = Q·Kᵀ` takes Kᵀ as the B operand: tile `(kk, ng)` row `d2` holds, for the 16 keys of
//!   group `ng`, the bf16 pair `K[n][32·kk + 2·d2 ..][..2]` (VNNI): a 16×16 transpose of the
//!   keys' 32-bit pairs.
//! - `O += P·V` takes V as the B operand: tile `(kp, dg)` row `i` holds, for the 16 dims of group
//!   `dg`, the pair `(V[32·kp + 2i][d], V[32·kp + 2i + 1][d])`: two value rows interleaved.

#![allow(clippy::needless_range_loop)] // shuffle stages are indexed like the math

use std::arch::x86_64::*;

use super::sys::{TILE_BYTES, TILE_ROW_BYTES, TILE_ROWS};

/// bf16 elements per tile row (one 32-element chunk of a row).
pub(crate) const CHUNK: usize = 32;

/// The 32 bf16 of `row[c0..c0 + 32]`, zero past `d` (never reading past it).
#[inline(always)]
unsafe fn load_chunk(row: *const u16, c0: usize, d: usize) -> __m512i {
    unsafe {
        if c0 + CHUNK <= d {
            _mm512_loadu_si512(row.add(c0) as *const _)
        } else {
            let n = d.saturating_sub(c0) as u32;
            _mm512_maskz_loadu_epi16(((1u64 << n) - 1) as u32, row.add(c0) as *const i16)
        }
    }
}

/// Transposes 16 rows of 16 32-bit elements in place.
#[inline(always)]
pub(crate) unsafe fn transpose_16x16(r: &mut [__m512i; 16]) {
    unsafe {
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        // u[4i + c], 128-bit lane L: column 4L + c of rows 4i..4i+4.
        let mut u = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        }
        // Row 4L + c = lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
        for c in 0..4 {
            let v0 = _mm512_shuffle_i32x4::<0x44>(u[c], u[4 + c]);
            let v1 = _mm512_shuffle_i32x4::<0xEE>(u[c], u[4 + c]);
            let w0 = _mm512_shuffle_i32x4::<0x44>(u[8 + c], u[12 + c]);
            let w1 = _mm512_shuffle_i32x4::<0xEE>(u[8 + c], u[12 + c]);
            r[c] = _mm512_shuffle_i32x4::<0x88>(v0, w0);
            r[4 + c] = _mm512_shuffle_i32x4::<0xDD>(v0, w0);
            r[8 + c] = _mm512_shuffle_i32x4::<0x88>(v1, w1);
            r[12 + c] = _mm512_shuffle_i32x4::<0xDD>(v1, w1);
        }
    }
}

/// Packs the 16 keys `rows` (each `d` bf16) as the B tiles of key group `ng` for every chunk:
/// tile `(kk, ng)` at `out + (kk·groups + ng)·TILE_BYTES`.
///
/// # Safety
/// Each row holds `d` values; `out` holds `chunks·groups` tiles with `ng < groups`.
#[inline(always)]
pub(crate) unsafe fn keys_t(
    rows: &[*const u16; TILE_ROWS],
    d: usize,
    chunks: usize,
    groups: usize,
    ng: usize,
    out: *mut u8,
) {
    unsafe {
        for kk in 0..chunks {
            let mut r = [_mm512_setzero_si512(); 16];
            for (n, row) in rows.iter().enumerate() {
                r[n] = load_chunk(*row, kk * CHUNK, d);
            }
            transpose_16x16(&mut r);
            let tile = out.add((kk * groups + ng) * TILE_BYTES);
            for (d2, v) in r.iter().enumerate() {
                _mm512_storeu_si512(tile.add(d2 * TILE_ROW_BYTES) as *mut _, *v);
            }
        }
    }
}

/// Packs value rows `even` and `odd` (keys `32·kp + 2i` and `+ 1`, `d` bf16 each) into row `i` of
/// the B tiles `(kp, dg)` for every dim group: tile at `out + (kp·dim_groups + dg)·TILE_BYTES`.
///
/// # Safety
/// Both rows hold `d` values; `out` holds the tiles of `kp` for `dim_groups = 2·chunks` groups.
#[inline(always)]
pub(crate) unsafe fn values_pair(
    even: *const u16,
    odd: *const u16,
    d: usize,
    chunks: usize,
    kp: usize,
    i: usize,
    out: *mut u8,
) {
    unsafe {
        // Word 2e of the low half takes even[e], word 2e + 1 odd[e] (`permutex2var`: bit 5 picks odd).
        let lo = _mm512_set_epi16(
            47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33,
            1, 32, 0,
        );
        let hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
        let dim_groups = 2 * chunks;
        for c in 0..chunks {
            let (a, b) = (load_chunk(even, c * CHUNK, d), load_chunk(odd, c * CHUNK, d));
            for (half, idx) in [lo, hi].into_iter().enumerate() {
                let tile = out.add((kp * dim_groups + 2 * c + half) * TILE_BYTES);
                _mm512_storeu_si512(tile.add(i * TILE_ROW_BYTES) as *mut _, _mm512_permutex2var_epi16(a, idx, b));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avx512bw() -> bool {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw")
    }

    #[test]
    fn keys_transpose_to_vnni_pairs() {
        if !avx512bw() {
            eprintln!("SKIP: no AVX-512BW");
            return;
        }
        let d = 45; // a partial last chunk
        let keys: Vec<Vec<u16>> = (0..16).map(|n| (0..d).map(|x| (n * 100 + x + 1) as u16).collect()).collect();
        let ptrs: [*const u16; 16] = std::array::from_fn(|n| keys[n].as_ptr());
        let (chunks, groups, ng) = (2, 3, 1);
        let mut out = vec![0xffffu16; chunks * groups * TILE_BYTES / 2];
        unsafe { keys_t(&ptrs, d, chunks, groups, ng, out.as_mut_ptr() as *mut u8) };
        for kk in 0..chunks {
            for d2 in 0..16 {
                for n in 0..16 {
                    for e in 0..2 {
                        let x = kk * 32 + 2 * d2 + e;
                        let want = if x < d { keys[n][x] } else { 0 };
                        let at = (kk * groups + ng) * TILE_BYTES / 2 + d2 * 32 + 2 * n + e;
                        assert_eq!(out[at], want, "kk {kk} d2 {d2} n {n} e {e}");
                    }
                }
            }
        }
    }

    #[test]
    fn value_pairs_interleave() {
        if !avx512bw() {
            eprintln!("SKIP: no AVX-512BW");
            return;
        }
        let d = 40;
        let even: Vec<u16> = (0..d).map(|x| x as u16 + 1).collect();
        let odd: Vec<u16> = (0..d).map(|x| x as u16 + 1001).collect();
        let (chunks, kp, i) = (2, 1, 5);
        let mut out = vec![0xffffu16; 2 * 2 * chunks * TILE_BYTES / 2];
        unsafe { values_pair(even.as_ptr(), odd.as_ptr(), d, chunks, kp, i, out.as_mut_ptr() as *mut u8) };
        for dg in 0..2 * chunks {
            for e in 0..16 {
                let x = dg * 16 + e;
                let at = (kp * 2 * chunks + dg) * TILE_BYTES / 2 + i * 32 + 2 * e;
                assert_eq!(out[at], if x < d { even[x] } else { 0 }, "dg {dg} e {e}");
                assert_eq!(out[at + 1], if x < d { odd[x] } else { 0 }, "dg {dg} e {e}");
            }
        }
    }
}

//! The planning logits (SPEC §2.2) of a group of units that share key tiles: per query row
//! (one unit's query head) and block, `numerics::dot(qmax + qmin, kmax)` and `(…, kmin)` bit for
//! bit, on a register-blocked micro-kernel.
//!
//! `dot`'s order fixes each product's lane (`i = dim % 8`) and adds a lane's products in dim order,
//! but leaves the lanes independent: the kernel runs lane by lane, so the eight keys of a tile sit
//! in a vector's lanes, one key vector serves `ROWS` query rows, and each lane's partial sum is
//! added onto the total in lane order as `dot` does — no horizontal sums, no transposes.

use super::simd_f64::{F64x8, MAX_ROWS};
use crate::alloc;
use crate::error::Result;
use crate::plan::PlanDims;

/// Keys per logit tile: one 512-bit vector of f64 lanes (the logits of eight blocks at once).
pub(super) const TILE_KEYS: usize = 8;
/// `dot`'s partial sums: products of dims `i, i + 8, i + 16, …` go to lane `i`.
const DOT_LANES: usize = 8;
/// Per row, its dots with the eight keys' max and min representatives.
pub(super) type RowDots = [[f64; TILE_KEYS]; 2];

/// The key representatives `[B][N][Hkv][2][D]` as tiles `[B·Hkv][N / TILE_KEYS][2][D][TILE_KEYS]`
/// (blocks past N zero): a tile is contiguous, and a query row meets its eight keys lane-wise.
pub(super) fn key_tiles(d: &PlanDims, dd: usize, krep: &[f64]) -> Result<Vec<f64>> {
    use rayon::prelude::*;
    let (n, hkv) = (d.blocks, d.kv_heads);
    let tiles = n.div_ceil(TILE_KEYS);
    let tile_len = 2 * dd * TILE_KEYS;
    let mut kt = alloc::zeroed::<f64>("the key representative tiles", &[d.batch * hkv, tiles, tile_len])?;
    if kt.is_empty() || krep.len() < d.batch * n * hkv * 2 * dd {
        return Ok(kt); // no block, or no candidate block: the representatives are never read
    }
    kt.par_chunks_mut(tile_len).enumerate().for_each(|(bht, tile)| {
        let (bh, t) = (bht / tiles, bht % tiles);
        let (b, h) = (bh / hkv, bh % hkv);
        for j in t * TILE_KEYS..n.min((t + 1) * TILE_KEYS) {
            put_in_tile(&krep[((b * n + j) * hkv + h) * 2 * dd..][..2 * dd], j % TILE_KEYS, tile);
        }
    });
    Ok(kt)
}

/// One block's representatives `[2][D]` (max then min) as key `l` of a tile `[2][D][TILE_KEYS]`.
#[inline]
pub(super) fn put_in_tile(block: &[f64], l: usize, tile: &mut [f64]) {
    for (i, &x) in block.iter().enumerate() {
        tile[i * TILE_KEYS + l] = x;
    }
}

/// `out[r] = (dot(rows[r], kmax_l), dot(rows[r], kmin_l))` for the eight keys `l` of `tile`
/// (`[2][D][TILE_KEYS]`) and the `V::ROWS` rows, each bit for bit `numerics::dot`: lane `i`'s
/// products added in dim order onto 0, the lanes added 0 to 7 onto 0, then the tail (the
/// `D % 8` last dims) in order.
#[inline(always)]
pub(super) fn row_dots<V: F64x8>(rows: &[&[f64]], tile: &[f64], out: &mut [RowDots]) {
    let dd = rows[0].len();
    assert!(rows.len() == V::ROWS && out.len() == V::ROWS && V::ROWS <= MAX_ROWS, "one micro-kernel's rows");
    assert!(rows.iter().all(|r| r.len() == dd) && tile.len() == 2 * dd * TILE_KEYS, "row and tile lengths");
    let (kmax, kmin) = (tile.as_ptr(), tile[dd * TILE_KEYS..].as_ptr());
    let whole = dd / DOT_LANES * DOT_LANES;
    out.fill([[0f64; TILE_KEYS]; 2]);
    // SAFETY: r < V::ROWS = rows.len() = out.len(); x < whole ≤ D, the length of every row and of
    // both key halves (`[D][TILE_KEYS]`, asserted); the ISA is `dispatch`'s.
    unsafe {
        for lane in 0..DOT_LANES {
            let mut acc = [[V::zero(); 2]; MAX_ROWS];
            for x in (lane..whole).step_by(DOT_LANES) {
                let kx = V::load(kmax.add(x * TILE_KEYS));
                let kn = V::load(kmin.add(x * TILE_KEYS));
                for r in 0..V::ROWS {
                    let q = V::splat(*rows.get_unchecked(r).get_unchecked(x));
                    acc[r][0] = V::add(acc[r][0], V::mul(q, kx));
                    acc[r][1] = V::add(acc[r][1], V::mul(q, kn));
                }
            }
            for r in 0..V::ROWS {
                for m in 0..2 {
                    let total = out.get_unchecked_mut(r)[m].as_mut_ptr();
                    V::store(total, V::add(V::load(total), acc[r][m]));
                }
            }
        }
    }
    let (kmax, kmin) = tile.split_at(dd * TILE_KEYS);
    let (kmax, kmin) = (kmax.as_chunks::<TILE_KEYS>().0, kmin.as_chunks::<TILE_KEYS>().0);
    for x in whole..dd {
        for (row, total) in rows.iter().zip(out.iter_mut()) {
            for l in 0..TILE_KEYS {
                total[0][l] += row[x] * kmax[x][l];
                total[1][l] += row[x] * kmin[x][l];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics;

    /// Bit for bit `numerics::dot`, for head dims with and without a tail and rows of every sign.
    #[test]
    fn row_dots_are_numerics_dot_bit_for_bit() {
        let mut rng = crate::synth::Rng::new(5);
        for dd in [1, 7, 8, 13, 64, 72, 128, 131] {
            let rows: Vec<Vec<f64>> = (0..MAX_ROWS).map(|_| (0..dd).map(|_| rng.normal() * 3.0).collect()).collect();
            let keys: Vec<[Vec<f64>; 2]> = (0..TILE_KEYS)
                .map(|_| [(0..dd).map(|_| rng.normal()).collect(), (0..dd).map(|_| rng.normal()).collect()])
                .collect();
            let mut tile = vec![0f64; 2 * dd * TILE_KEYS];
            for (l, k) in keys.iter().enumerate() {
                for m in 0..2 {
                    for x in 0..dd {
                        tile[(m * dd + x) * TILE_KEYS + l] = k[m][x];
                    }
                }
            }
            let check = |out: &[RowDots], isa: &str| {
                for (r, got) in out.iter().enumerate() {
                    for (l, k) in keys.iter().enumerate() {
                        for m in 0..2 {
                            let want = numerics::dot(&rows[r], &k[m]);
                            assert_eq!(got[m][l].to_bits(), want.to_bits(), "{isa}: D {dd} row {r} key {l} half {m}");
                        }
                    }
                }
            };
            let run = |n: usize, f: &dyn Fn(&[&[f64]], &mut [RowDots])| {
                let mut out = vec![[[f64::NAN; TILE_KEYS]; 2]; n];
                let r: Vec<&[f64]> = rows[..n].iter().map(|r| &r[..]).collect();
                f(&r, &mut out);
                out
            };
            check(&run(<[f64; 8]>::ROWS, &|r, o| row_dots::<[f64; 8]>(r, &tile, o)), "portable");
            #[cfg(target_arch = "x86_64")]
            {
                use crate::cpu::simd_f64::Ymm2;
                use std::arch::x86_64::__m512d;
                if is_x86_feature_detected!("avx2") {
                    check(&run(Ymm2::ROWS, &|r, o| row_dots::<Ymm2>(r, &tile, o)), "avx2");
                }
                if is_x86_feature_detected!("avx512f") {
                    check(&run(__m512d::ROWS, &|r, o| row_dots::<__m512d>(r, &tile, o)), "avx512");
                }
            }
        }
    }
}

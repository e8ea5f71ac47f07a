//! Planning representatives (SPEC §2.1): the element-wise max and min of a segment's queries or a
//! block's keys, in f32 (exact in any precision), stored as f64 for the logits. One pass over
//! Q and K, so it runs at memory speed: rows widened and compared a vector at a time.

use super::plan_logits::{TILE_KEYS, key_slot};
use super::simd::{Isa, KeepSubnormals, Simd, WithSimd, dispatch};
use crate::numerics::LogitPrecision;
use crate::tensor::Element;

/// A task's running max and min `[heads][D]`.
#[derive(Default)]
pub(super) struct Scratch {
    mx: Vec<f32>,
    mn: Vec<f32>,
}

/// Element-wise max and min over `tokens` of every head into `out` `[heads][2][D]` (max then
/// min, f64), row `(t, h)` read by `row_of`. A NaN element is skipped (the max and min of the
/// others), as `f32::max` and `f32::min` would.
pub(super) fn representatives<'r, E: Element>(
    isa: Isa,
    row_of: impl Fn(usize, usize) -> &'r [E],
    tokens: std::ops::Range<usize>,
    heads: usize,
    d: usize,
    out: &mut [f64],
    scratch: &mut Scratch,
) {
    let _exact = KeepSubnormals::new(); // DAZ would read subnormal inputs as zero
    dispatch(isa, Representatives { row_of, tokens, heads, d, out, scratch })
}

struct Representatives<'a, R> {
    row_of: R,
    tokens: std::ops::Range<usize>,
    heads: usize,
    d: usize,
    out: &'a mut [f64],
    scratch: &'a mut Scratch,
}

impl<'r, 'a, E: Element, R: Fn(usize, usize) -> &'r [E]> WithSimd for Representatives<'a, R> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self) {
        let Representatives { row_of, tokens, heads, d, out, scratch } = self;
        let Scratch { mx, mn } = scratch;
        mx.clear();
        mx.resize(heads * d, f32::NEG_INFINITY);
        mn.clear();
        mn.resize(heads * d, f32::INFINITY);
        for t in tokens {
            for h in 0..heads {
                fold_row::<S, E>(row_of(t, h), &mut mx[h * d..(h + 1) * d], &mut mn[h * d..(h + 1) * d]);
            }
        }
        for h in 0..heads {
            for i in 0..d {
                out[(h * 2) * d + i] = mx[h * d + i] as f64;
                out[(h * 2 + 1) * d + i] = mn[h * d + i] as f64;
            }
        }
    }
}

/// Folds row `src` into the running max `a` and min `c` (all D long), widened in registers: no
/// trip through a row buffer. A NaN element leaves the running values as they are.
#[inline(always)]
fn fold_row<S: Simd, E: Element>(src: &[E], a: &mut [f32], c: &mut [f32]) {
    let d = a.len();
    assert!(src.len() == d && c.len() == d, "a row of D elements");
    let whole = d / S::LANES * S::LANES;
    // SAFETY: `src`, `a` and `c` hold D values each, i + LANES ≤ whole ≤ D; the ISA is the
    // caller's `dispatch`'s.
    unsafe {
        for i in (0..whole).step_by(S::LANES) {
            let x = S::load_widen(src.as_ptr().add(i));
            // The row first: where it is NaN, the running value stays.
            S::store(a.as_mut_ptr().add(i), S::max(x, S::load(a.as_ptr().add(i))));
            S::store(c.as_mut_ptr().add(i), S::min(x, S::load(c.as_ptr().add(i))));
        }
    }
    for i in whole..d {
        let x = src[i].to_f32();
        a[i] = if x > a[i] { x } else { a[i] };
        c[i] = if x < c[i] { x } else { c[i] };
    }
}

/// The key representatives of `blocks` (at most [`TILE_KEYS`] blocks of `block_size` tokens) of
/// every kv head, straight into their logit tiles `heads` (`[heads][tile]`, laid out by
/// [`key_slot`] for `precision`; written whole, missing blocks zero): each block's max and min
/// rows folded in f32, then eight dims of the eight blocks transposed at a time
/// ([`Simd::transpose8`]) — no f64 representatives between. Returns the OR of the values' f64
/// bits, as [`super::plan_logits::fill_tiles`] does for the same representatives.
pub(super) fn key_tile<'r, E: Element>(
    isa: Isa,
    row_of: impl Fn(usize, usize) -> &'r [E],
    blocks: std::ops::Range<usize>,
    block_size: usize,
    d: usize,
    precision: LogitPrecision,
    heads: &mut [f32],
) -> u64 {
    let _exact = KeepSubnormals::new(); // DAZ would read subnormal inputs as zero
    dispatch(isa, KeyTile { row_of, blocks, block_size, d, precision, heads })
}

struct KeyTile<'a, R> {
    row_of: R,
    blocks: std::ops::Range<usize>,
    block_size: usize,
    d: usize,
    precision: LogitPrecision,
    heads: &'a mut [f32],
}

impl<'r, 'a, E: Element, R: Fn(usize, usize) -> &'r [E]> WithSimd for KeyTile<'a, R> {
    /// The OR of the representatives' f64 bits.
    type Output = u64;
    #[inline(always)]
    fn with_simd<S: Simd>(self) -> u64 {
        let KeyTile { row_of, blocks, block_size, d, precision, heads } = self;
        let tile_len = 2 * d * TILE_KEYS;
        let nh = heads.len() / tile_len.max(1);
        let nb = blocks.len();
        assert!(nb <= TILE_KEYS && heads.len() == nh * tile_len, "a tile's blocks of every head");
        // `[heads][max, min][TILE_KEYS][D]`: each block's max and min rows, tokens read in K's
        // order (a token's heads side by side); missing blocks zero, as the tile keeps them.
        let mut reps = vec![0f32; nh * tile_len];
        for h in 0..nh {
            for (m, init) in [f32::NEG_INFINITY, f32::INFINITY].into_iter().enumerate() {
                reps[((2 * h + m) * TILE_KEYS) * d..][..nb * d].fill(init);
            }
        }
        let row = |h: usize, m: usize, l: usize| ((2 * h + m) * TILE_KEYS + l) * d;
        for (l, j) in blocks.enumerate() {
            for t in j * block_size..(j + 1) * block_size {
                for h in 0..nh {
                    let (mx, mn) = reps.split_at_mut(row(h, 1, l));
                    fold_row::<S, E>(row_of(t, h), &mut mx[row(h, 0, l)..][..d], &mut mn[..d]);
                }
            }
        }
        let or = reps.iter().fold(0, |or, &v| or | f64::from(v).to_bits());
        // Eight dims of the eight blocks' max (or min) rows at a time, transposed: dim x's keys.
        let whole = d / TILE_KEYS * TILE_KEYS;
        for (h, tile) in heads.chunks_exact_mut(tile_len.max(1)).enumerate() {
            for m in 0..2 {
                let rows = &reps[row(h, m, 0)..][..TILE_KEYS * d];
                let mut keys = [[0f32; TILE_KEYS]; TILE_KEYS];
                for x0 in (0..whole).step_by(TILE_KEYS) {
                    // SAFETY: rows l < 8 hold D ≥ x0 + 8 values each; the ISA is `dispatch`'s.
                    unsafe { S::transpose8(rows.as_ptr().add(x0), d, &mut keys) };
                    for (i, keys) in keys.iter().enumerate() {
                        tile[key_slot(precision, m, x0 + i, d)..][..TILE_KEYS].copy_from_slice(keys);
                    }
                }
                for x in whole..d {
                    let key = &mut tile[key_slot(precision, m, x, d)..][..TILE_KEYS];
                    for (l, k) in key.iter_mut().enumerate() {
                        *k = rows[l * d + x];
                    }
                }
            }
        }
        or
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::plan_logits::fill_tiles;
    use crate::synth::{Rng, test_seed};
    use half::bf16;

    /// A value of an input: mostly normal, sometimes NaN, ±0, ±inf or subnormal.
    fn value(rng: &mut Rng) -> f32 {
        match rng.next_u64() % 40 {
            0 => f32::NAN,
            1 => -0.0,
            2 => f32::INFINITY,
            3 => f32::NEG_INFINITY,
            4 => f32::from_bits(1 + (rng.next_u64() % 0x7F_FFFF) as u32) * if rng.uniform() < 0.5 { -1.0 } else { 1.0 },
            _ => rng.normal() as f32 * 3.0,
        }
    }

    /// The tiles of `key_tile` on `isa` against the scalar max/min (NaN skipped) of the same rows
    /// laid out by `fill_tiles`, and the two ORs: values that differ, plus one if the ORs do.
    fn mismatches<E: Element>(
        isa: Isa,
        rng: &mut Rng,
        shape: (usize, usize, usize, usize),
        p: LogitPrecision,
    ) -> usize {
        let (heads, d, nb, bk) = shape;
        let tokens = nb * bk;
        let k: Vec<E> = (0..tokens * heads * d).map(|_| E::from_f32(value(rng))).collect();
        let row_of = |t: usize, h: usize| &k[(t * heads + h) * d..][..d];
        // `[blocks][heads][2][D]`, max then min, as f64: the representatives `fill_tiles` takes.
        let mut reps = vec![0f64; nb * heads * 2 * d];
        for (j, block) in reps.chunks_exact_mut(heads * 2 * d).enumerate() {
            for (h, hm) in block.chunks_exact_mut(2 * d).enumerate() {
                for x in 0..d {
                    let (mut mx, mut mn) = (f32::NEG_INFINITY, f32::INFINITY);
                    for t in j * bk..(j + 1) * bk {
                        let v = row_of(t, h)[x].to_f32();
                        mx = if v > mx { v } else { mx };
                        mn = if v < mn { v } else { mn };
                    }
                    (hm[x], hm[d + x]) = (mx as f64, mn as f64);
                }
            }
        }
        let mut want = vec![0f32; heads * 2 * d * TILE_KEYS];
        let want_or = fill_tiles(&reps, heads, d, &mut want, p);
        let mut got = vec![f32::NAN; want.len()]; // poisoned: every value must be written
        let got_or = key_tile::<E>(isa, row_of, 0..nb, bk, d, p, &mut got);
        let bad = want.iter().zip(&got).filter(|(w, g)| w.to_bits() != g.to_bits()).count();
        bad + usize::from(want_or != got_or)
    }

    #[test]
    fn key_tiles_are_the_representatives_in_tile_layout_on_every_isa() {
        let mut rng = Rng::new(test_seed());
        let mut ran = Vec::new();
        for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
            for shape in [(2, 128, 8, 8), (1, 20, 3, 4), (3, 8, 8, 1), (2, 36, 5, 2), (1, 3, 1, 3)] {
                for p in [LogitPrecision::F64, LogitPrecision::F32] {
                    assert_eq!(mismatches::<f32>(isa, &mut rng, shape, p), 0, "{isa:?} f32 {shape:?} {p:?}");
                    assert_eq!(mismatches::<bf16>(isa, &mut rng, shape, p), 0, "{isa:?} bf16 {shape:?} {p:?}");
                }
            }
            ran.push(isa);
        }
        eprintln!("ran on {ran:?}");
    }
}

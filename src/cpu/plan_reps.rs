//! Planning representatives (SPEC §2.1): the element-wise max and min of a segment's queries or a
//! block's keys, in f32 (exact in any precision), stored as f64 for the logits. One pass over
//! Q and K, so it runs at memory speed: rows widened and compared a vector at a time.

use super::simd::{Isa, KeepSubnormals, Simd, WithSimd, dispatch};
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
        let whole = d / S::LANES * S::LANES;
        for t in tokens {
            for h in 0..heads {
                let (a, c) = (&mut mx[h * d..(h + 1) * d], &mut mn[h * d..(h + 1) * d]);
                let src = row_of(t, h);
                assert_eq!(src.len(), d, "a row of D elements");
                // SAFETY: `src`, `a` and `c` hold D values each, i + LANES ≤ whole ≤ D; the ISA is
                // `dispatch`'s. Widened in registers: no trip through a row buffer.
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
        }
        for h in 0..heads {
            for i in 0..d {
                out[(h * 2) * d + i] = mx[h * d + i] as f64;
                out[(h * 2 + 1) * d + i] = mn[h * d + i] as f64;
            }
        }
    }
}

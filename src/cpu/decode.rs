//! Decode attention over compacted caches with per-head lengths (flash-decoding on the CPU):
//! work units are (batch, cache head, key chunk); each computes partial (max, sum, output) for the
//! group's query rows, vectorised over the head dim; partials are merged per head.

use rayon::prelude::*;

use super::simd::{Isa, Simd, WithSimd, dispatch};
use super::{SendPtr, Strided};
use crate::alloc;
use crate::error::Result;
use crate::tensor::{Element, TensorViewMut};
use crate::validate::{DecodeArgs, DecodeDims};

/// Keys per work unit: long caches split so both cores stay busy.
const KEYS_PER_UNIT: usize = 512;

struct Call<'a, E> {
    q: Strided<'a, E>,
    k: Strided<'a, E>,
    v: Strided<'a, E>,
    lengths: &'a [u32],
    dims: DecodeDims,
    c: f32,
}

/// Partial result of one unit, in its slice of one buffer for all units (rows = queries × G):
/// per query row the max (base 2) `[rows]`, the sum `[rows]`, the unnormalised output `[rows][D]`.
struct Partial<'p> {
    m: &'p mut [f32],
    l: &'p mut [f32],
    o: &'p mut [f32],
}

impl<'p> Partial<'p> {
    fn of(part: &'p mut [f32], rows: usize) -> Self {
        let (m, rest) = part.split_at_mut(rows);
        let (l, o) = rest.split_at_mut(rows);
        Partial { m, l, o }
    }
}

/// Dot product of `a` (f32) with `b`, vectorised over the head dim.
#[inline(always)]
pub(crate) unsafe fn dot<S: Simd>(a: *const f32, b: *const f32, d: usize) -> f32 {
    unsafe {
        let mut acc0 = S::zero();
        let mut acc1 = S::zero();
        let mut i = 0;
        while i + 2 * S::LANES <= d {
            acc0 = S::fma(S::load(a.add(i)), S::load(b.add(i)), acc0);
            acc1 = S::fma(S::load(a.add(i + S::LANES)), S::load(b.add(i + S::LANES)), acc1);
            i += 2 * S::LANES;
        }
        while i < d {
            let n = (d - i).min(S::LANES);
            let (x, y) = if n == S::LANES {
                (S::load(a.add(i)), S::load(b.add(i)))
            } else {
                (S::load_partial(a.add(i), n), S::load_partial(b.add(i), n))
            };
            acc0 = S::fma(x, y, acc0);
            i += n;
        }
        S::hsum(S::add(acc0, acc1))
    }
}

/// `o += p · v`, vectorised over the head dim.
#[inline(always)]
pub(crate) unsafe fn axpy<S: Simd>(p: f32, v: *const f32, o: *mut f32, d: usize) {
    unsafe {
        let pb = S::splat(p);
        let mut i = 0;
        while i < d {
            let n = (d - i).min(S::LANES);
            if n == S::LANES {
                S::store(o.add(i), S::fma(pb, S::load(v.add(i)), S::load(o.add(i))));
            } else {
                S::store_partial(o.add(i), S::fma(pb, S::load_partial(v.add(i), n), S::load_partial(o.add(i), n)), n);
            }
            i += n;
        }
    }
}

struct UnitJob<'a, 'c, 'p, E> {
    call: &'c Call<'a, E>,
    b: usize,
    h: usize,
    keys: std::ops::Range<usize>,
    buf: &'c mut Vec<f32>,
    part: Partial<'p>,
}

impl<E: Element> WithSimd for UnitJob<'_, '_, '_, E> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self) {
        let UnitJob { call, b, h, keys, buf, part } = self;
        let Partial { m, l, o: out } = part;
        let dm = call.dims;
        let (g, d, nq) = (dm.group(), dm.head_dim, dm.queries);
        let rows = nq * g;
        let n = keys.len();
        // buf: queries [rows][d], one widened key/value row [d], scores [rows][n].
        buf.clear();
        buf.resize(rows * d + d + rows * n, 0.0);
        let (qbuf, rest) = buf.split_at_mut(rows * d);
        let (row, scores) = rest.split_at_mut(d);
        for i in 0..nq {
            for j in 0..g {
                let dst = &mut qbuf[(i * g + j) * d..(i * g + j + 1) * d];
                E::widen(call.q.row(b, i, h * g + j, d), dst);
                dst.iter_mut().for_each(|x| *x *= call.c);
            }
        }
        for (jn, t) in keys.clone().enumerate() {
            E::widen(call.k.row(b, h, t, d), row);
            for r in 0..rows {
                // SAFETY: both rows hold d values.
                scores[r * n + jn] = unsafe { dot::<S>(qbuf[r * d..].as_ptr(), row.as_ptr(), d) };
            }
        }
        for r in 0..rows {
            let s = &mut scores[r * n..(r + 1) * n];
            m[r] = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for x in s.iter_mut() {
                *x = (*x - m[r]).exp2();
                sum += *x;
            }
            l[r] = sum;
        }
        out.fill(0.0);
        for (jn, t) in keys.enumerate() {
            E::widen(call.v.row(b, h, t, d), row);
            for r in 0..rows {
                // SAFETY: `row` and each output row hold d values.
                unsafe { axpy::<S>(scores[r * n + jn], row.as_ptr(), out[r * d..].as_mut_ptr(), d) };
            }
        }
    }
}

pub(crate) fn decode<E: Element>(isa: Isa, a: &DecodeArgs<'_>, out: &mut TensorViewMut<'_>) -> Result<()> {
    let dm = a.dims();
    let call = Call::<E> {
        q: Strided::of(&a.q()),
        k: Strided::of(&a.k_cache()),
        v: Strided::of(&a.v_cache()),
        lengths: a.lengths(),
        dims: dm,
        c: a.scale() * std::f32::consts::LOG2_E,
    };
    let mut units = Vec::new();
    for b in 0..dm.batch {
        for h in 0..dm.cache_heads {
            let len = call.lengths[b * dm.cache_heads + h] as usize;
            for k0 in (0..len).step_by(KEYS_PER_UNIT) {
                units.push((b, h, k0..(k0 + KEYS_PER_UNIT).min(len)));
            }
        }
    }
    // One partial per unit: (queries × G) × (D + 2) values each, a multiple of q's size.
    let (g, d, nq) = (dm.group(), dm.head_dim, dm.queries);
    let rows = nq * g;
    let per_unit = rows * (d + 2);
    let mut partials = alloc::grid("the decode partials", &[units.len(), per_unit], 0f32)?;
    partials.par_chunks_mut(per_unit).zip(units.par_iter()).for_each_init(Vec::new, |buf, (part, (b, h, keys))| {
        let part = Partial::of(part, rows);
        dispatch(isa, UnitJob { call: &call, b: *b, h: *h, keys: keys.clone(), buf, part })
    });
    // Merge the chunks of each head (units of one head are consecutive) and write.
    let os = out.strides();
    let out_ptr = SendPtr(out.typed_mut::<E>().expect("dtype checked by validation").as_mut_ptr());
    let mut start = 0;
    let mut heads = Vec::new();
    while start < units.len() {
        let (b, h, _) = units[start].clone();
        let end = start + units[start..].iter().take_while(|u| u.0 == b && u.1 == h).count();
        heads.push((b, h, start..end));
        start = end;
    }
    heads.par_iter().for_each(|(b, h, range)| {
        let parts = &partials[range.start * per_unit..range.end * per_unit];
        // A unit's slice: maxima [rows], sums [rows], outputs [rows][D].
        let (pm, pl, po) = (|p: &[f32], r: usize| p[r], |p: &[f32], r: usize| p[rows + r], |r: usize| 2 * rows + r * d);
        let mut o = vec![0f32; d];
        let mut tmp = vec![E::default(); d];
        for i in 0..nq {
            for j in 0..g {
                let r = i * g + j;
                let mx = parts.chunks(per_unit).map(|p| pm(p, r)).fold(f32::NEG_INFINITY, f32::max);
                o.fill(0.0);
                let mut l = 0.0;
                for p in parts.chunks(per_unit) {
                    let w = (pm(p, r) - mx).exp2();
                    l += pl(p, r) * w;
                    o.iter_mut().zip(&p[po(r)..po(r) + d]).for_each(|(x, y)| *x += w * y);
                }
                o.iter_mut().for_each(|x| *x /= l);
                E::narrow(&o, &mut tmp);
                let off = b * os[0] + i * os[1] + (h * g + j) * os[2];
                // SAFETY: each (b, query, head) output row is written by exactly one head task.
                unsafe { std::ptr::copy_nonoverlapping(tmp.as_ptr(), out_ptr.ptr().add(off), d) };
            }
        }
    });
    Ok(())
}

//! Attention over a cache for calls with few query rows per (sequence, head) — decode steps,
//! speculative or chunked decode — split along the keys (flash-decoding): one work unit per
//! (sequence, cache head, key chunk) computes partial (max, sum, output) for the head's query rows,
//! vectorised over the head dim, with the bottom-right causal limit per row; the partials of a
//! head are merged. Every buffer lives in the workspace: a decode step allocates nothing.

use rayon::prelude::*;

use super::simd::{Isa, Simd, WithSimd, dispatch};
use super::{SendPtr, Strided};
use crate::engine::AttendArgs;
use crate::tensor::Element;

/// Query rows (tokens × group) up to which a call takes this path.
pub(crate) const MAX_ROWS: usize = 16;
/// Keys per work unit: long caches split so every core has work even at batch 1.
const KEYS_PER_UNIT: usize = 512;
/// Fewest keys per unit: below it a unit's fixed costs (queries, merge) dominate.
const MIN_KEYS_PER_UNIT: usize = 64;
/// Units per worker thread a call aims for, so that short caches still balance across cores.
const UNITS_PER_THREAD: usize = 4;

/// One unit: entries `k0..k1` of every cache head of sequence `i` (all heads at once, so a
/// slot-major page, whose slot holds every head's row side by side, is read in order).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Unit {
    i: usize,
    k0: usize,
    k1: usize,
}

/// The split path's buffers, kept in the workspace.
#[derive(Default)]
pub(crate) struct SplitScratch {
    units: Vec<Unit>,
    /// Per unit: maxima `[R]`, sums `[R]`, outputs `[R][D]` (R = the call's largest row count).
    partials: Vec<f32>,
    /// Per (sequence, head): its units' range.
    heads: Vec<(usize, usize, std::ops::Range<usize>)>,
    /// One per worker: queries `[R][D]`, a widened row `[D]`, scores `[R][KEYS_PER_UNIT]`; and
    /// the unit's entry offsets.
    bufs: Vec<std::sync::Mutex<(Vec<f32>, Vec<usize>)>>,
}

/// Whether a call takes the split path.
pub(crate) fn applies(a: &AttendArgs<'_>) -> bool {
    let d = a.dims();
    (0..d.sequences).all(|i| a.tokens(i).len() * d.group() <= MAX_ROWS)
        && (0..d.sequences).all(|i| a.blocks(i).is_none())
}

struct Call<'a, 'c, E> {
    args: &'c AttendArgs<'a>,
    q: Strided<'a, E>,
    k: &'a [E],
    v: &'a [E],
    c: f32,
    /// Rows per unit slot.
    r: usize,
}

struct UnitJob<'a, 'c, 'p, E> {
    call: &'c Call<'a, 'c, E>,
    unit: Unit,
    buf: &'c mut Vec<f32>,
    offsets: &'c mut Vec<usize>,
    part: &'p mut [f32],
}

impl<E: Element> WithSimd for UnitJob<'_, '_, '_, E> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self) {
        let UnitJob { call, unit, buf, offsets, part } = self;
        let a = call.args;
        let dm = a.dims();
        let (g, d, hc) = (dm.group(), dm.head_dim, dm.cache_heads);
        let Unit { i, k0, k1 } = unit;
        let tokens = a.tokens(i);
        // Rows of one head (its queries × group), then of the unit (every head).
        let rh = tokens.len() * g;
        let rows = hc * rh;
        let n = k1 - k0;
        // Sized by `attend` before the units run.
        debug_assert!(buf.len() >= call.r * d + d + call.r * KEYS_PER_UNIT && offsets.len() >= KEYS_PER_UNIT);
        let (qbuf, rest) = buf.split_at_mut(call.r * d);
        let (row, scores) = rest.split_at_mut(d);
        for h in 0..hc {
            for (j, t) in tokens.clone().enumerate() {
                let (b, t) = a.q_row(t);
                for gi in 0..g {
                    let r = h * rh + j * g + gi;
                    let dst = &mut qbuf[r * d..(r + 1) * d];
                    unsafe { S::widen(call.q.row(b, t, h * g + gi, d), dst) }; // SAFETY: dst holds d
                    dst.iter_mut().for_each(|x| *x *= call.c);
                }
            }
        }
        // The unit's entry offsets for head 0, walked page by page (K and V share the layout;
        // head h is `h·head_stride` further).
        let cache = a.cache();
        let hs = cache.layout().strides[2];
        for (o, (_, off)) in offsets.iter_mut().zip(super::engine::rows(cache, call.k, i, 0).walk(k0..k1)) {
            *o = off;
        }
        let offs = &offsets[..k1 - k0];
        let lens = &cache.lens()[i * hc..(i + 1) * hc];
        let (m, rest) = part.split_at_mut(call.r);
        let (l, out) = rest.split_at_mut(call.r);
        for (jn, t) in (k0..k1).enumerate() {
            for (h, &len) in lens.iter().enumerate() {
                let head_rows = h * rh..(h + 1) * rh;
                if t >= len as usize {
                    // Past this head's entries (its pages may end here): nothing to read.
                    head_rows.for_each(|r| scores[r * n + jn] = f32::NEG_INFINITY);
                    continue;
                }
                let o = offs[jn] + h * hs;
                unsafe { S::widen(&call.k[o..o + d], row) }; // SAFETY: row holds d
                for r in head_rows {
                    // Bottom-right causal: query j of the head sees entries up to q_start + j.
                    scores[r * n + jn] = if t < a.visible_end(i, h, (r - h * rh) / g) {
                        // SAFETY: both rows hold d values.
                        unsafe { dot::<S>(qbuf[r * d..].as_ptr(), row.as_ptr(), d) }
                    } else {
                        f32::NEG_INFINITY
                    };
                }
            }
        }
        for r in 0..rows {
            let s = &mut scores[r * n..(r + 1) * n];
            m[r] = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            // A row that sees none of these keys contributes nothing (sum 0, not NaN).
            let base = m[r].max(f32::MIN);
            let mut sum = 0.0;
            for x in s.iter_mut() {
                *x = (*x - base).exp2();
                sum += *x;
            }
            l[r] = sum;
        }
        out[..rows * d].fill(0.0);
        for (jn, t) in (k0..k1).enumerate() {
            for h in (0..hc).filter(|&h| t < lens[h] as usize) {
                let o = offs[jn] + h * hs;
                unsafe { S::widen(&call.v[o..o + d], row) }; // SAFETY: row holds d
                for r in h * rh..(h + 1) * rh {
                    // SAFETY: `row` and each output row hold d values.
                    unsafe { axpy::<S>(scores[r * n + jn], row.as_ptr(), out[r * d..].as_mut_ptr(), d) };
                }
            }
        }
    }
}

/// Runs a call that [`applies`] on the split path.
pub(crate) fn attend<E: Element>(
    isa: Isa,
    a: &AttendArgs<'_>,
    out: SendPtr<E>,
    os: [usize; 4],
    lse: Option<SendPtr<f32>>,
    s: &mut SplitScratch,
) {
    let dm = a.dims();
    let (g, d) = (dm.group(), dm.head_dim);
    let cache = a.cache();
    let hc = dm.cache_heads;
    let r = (0..dm.sequences).map(|i| hc * a.tokens(i).len() * g).max().unwrap_or(0).max(1);
    s.units.clear();
    s.heads.clear();
    // Keys per unit: KEYS_PER_UNIT, fewer when the call has too few keys to feed every core.
    let threads = rayon::current_num_threads();
    let longest = |i: usize| (0..hc).map(|h| a.len(i, h)).max().unwrap_or(0);
    let keys: usize = (0..dm.sequences).filter(|&i| !a.tokens(i).is_empty()).map(longest).sum();
    let per_unit = (keys / (UNITS_PER_THREAD * threads))
        .next_multiple_of(MIN_KEYS_PER_UNIT)
        .clamp(MIN_KEYS_PER_UNIT, KEYS_PER_UNIT);
    for i in 0..dm.sequences {
        if a.tokens(i).is_empty() {
            continue;
        }
        let (first, longest) = (s.units.len(), longest(i));
        for k0 in (0..longest).step_by(per_unit) {
            s.units.push(Unit { i, k0, k1: (k0 + per_unit).min(longest) });
        }
        for h in 0..hc {
            s.heads.push((i, h, first..s.units.len()));
        }
    }
    let stride = r * (d + 2);
    if s.partials.len() < s.units.len() * stride {
        s.partials.resize(s.units.len() * stride, 0.0);
    }
    if s.bufs.len() != threads {
        s.bufs = (0..threads).map(|_| std::sync::Mutex::new((Vec::new(), Vec::new()))).collect();
    }
    // Every worker's buffers sized here, not on its first unit: which worker runs a unit varies
    // from call to call, and a call after the first must not allocate.
    let need = r * d + d + r * KEYS_PER_UNIT;
    for b in &s.bufs {
        let mut guard = b.lock().unwrap_or_else(|e| e.into_inner());
        let (buf, offsets) = &mut *guard;
        if buf.len() < need.max(2 * d) {
            buf.resize(need.max(2 * d), 0.0);
        }
        if offsets.len() < KEYS_PER_UNIT {
            offsets.resize(KEYS_PER_UNIT, 0);
        }
    }
    let call = Call {
        args: a,
        q: Strided::of(&a.q()),
        k: cache.k().typed::<E>().expect("dtype checked by validation"),
        v: cache.v().typed::<E>().expect("dtype checked by validation"),
        c: a.scale() * std::f32::consts::LOG2_E,
        r,
    };
    let bufs = &s.bufs;
    s.partials[..s.units.len() * stride].par_chunks_mut(stride).zip(s.units.par_iter()).for_each(|(part, &unit)| {
        let slot = rayon::current_thread_index().unwrap_or(0) % bufs.len();
        let mut guard = bufs[slot].lock().unwrap_or_else(|e| e.into_inner());
        let (buf, offsets) = &mut *guard;
        dispatch(isa, UnitJob { call: &call, unit, buf, offsets, part });
    });
    let partials = &s.partials;
    s.heads.par_iter().for_each(|(i, h, range)| {
        let parts = &partials[range.start * stride..range.end * stride];
        let tokens = a.tokens(*i);
        let slot = rayon::current_thread_index().unwrap_or(0) % bufs.len();
        let mut guard = bufs[slot].lock().unwrap_or_else(|e| e.into_inner());
        let (o, _) = guard.0.split_at_mut(d);
        let rh = tokens.len() * g;
        for (j, t) in tokens.clone().enumerate() {
            let (b, tq) = a.q_row(t);
            for gi in 0..g {
                let row = h * rh + j * g + gi;
                let mx = parts.chunks(stride).map(|p| p[row]).fold(f32::NEG_INFINITY, f32::max).max(f32::MIN);
                o.fill(0.0);
                let mut l = 0.0;
                for p in parts.chunks(stride) {
                    let w = (p[row].max(f32::MIN) - mx).exp2();
                    l += p[r + row] * w;
                    o.iter_mut().zip(&p[2 * r + row * d..2 * r + (row + 1) * d]).for_each(|(x, y)| *x += w * y);
                }
                let inv = 1.0 / l;
                o.iter_mut().for_each(|x| *x *= inv);
                let hq = h * g + gi;
                // SAFETY: each (token, query head) row of `out` and `lse` is written by one head task.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(out.ptr().add(b * os[0] + tq * os[1] + hq * os[2]), d) };
                E::narrow(o, dst);
                if let Some(lse) = lse {
                    unsafe { *lse.ptr().add(a.lse_index(t, hq)) = (mx + l.log2()) * std::f32::consts::LN_2 };
                }
            }
        }
    });
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

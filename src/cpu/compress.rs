//! `kv_compress` on the CPU (SPEC §4): the window's G·W query rows of a kv head are scored
//! against the whole cache with the tile microkernel (pass 1, per key chunk: scores plus partial
//! max and sum), chunks are merged into each row's softmax normaliser, and pass 2 turns the scores
//! into window-mean probabilities. Group reduction, pooling, selection and the gather follow the
//! shared rules in `crate::compress`.

use rayon::prelude::*;

use super::Strided;
use super::simd::{Isa, Simd, WithSimd, dispatch};
use super::tile::{Geom, Tile};
use crate::compress::{self, CompressedCache};
use crate::config::GqaMode;
use crate::tensor::Element;
use crate::validate::{CompressArgs, CompressDims};

/// Keys per pass-1 work unit.
const KEYS_PER_UNIT: usize = 2048;

struct Call<'a, E> {
    obs: Strided<'a, E>,
    k: Strided<'a, E>,
    d: CompressDims,
    c: f32,
    geom: Geom,
}

/// Pass-1 result of one (b, h, chunk): scores `[keys][mp]` (base 2) and per-row max and sum.
struct Chunk {
    scores: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

struct ScoreJob<'a, 'c, E> {
    call: &'c Call<'a, E>,
    b: usize,
    h: usize,
    keys: std::ops::Range<usize>,
    tile: &'c mut Tile,
    tmp: &'c mut Vec<f32>,
}

impl<E: Element> WithSimd for ScoreJob<'_, '_, E> {
    type Output = Chunk;
    #[inline(always)]
    fn with_simd<S: Simd>(self) -> Chunk {
        if S::LANES >= 16 { score_chunk::<S, E, 8, 3>(self) } else { score_chunk::<S, E, 4, 3>(self) }
    }
}

#[inline(always)]
fn score_chunk<S: Simd, E: Element, const NR: usize, const MV: usize>(job: ScoreJob<'_, '_, E>) -> Chunk {
    let ScoreJob { call, b, h, keys, tile, tmp } = job;
    let d = call.d;
    let (g, w, dd) = (d.group(), d.window, d.head_dim);
    let mp = call.geom.mp;
    // Window query wi is aligned with cache entry N - W + wi: later entries are masked.
    tile.begin(d.entries - w, g);
    for wi in 0..w {
        for j in 0..g {
            tile.set_query(wi * g + j, call.obs.row(b, h * g + j, wi, dd), call.c, tmp);
        }
    }
    tile.clear_queries(w * g);
    let k = call.k.rows(b, h, 2);
    let n = keys.len();
    let mut scores = vec![0f32; n * mp];
    let mut done = 0;
    for t in keys {
        tile.push_key(&k, t);
        if tile.is_full() {
            drain::<S, NR, MV>(tile, &mut scores, &mut done, mp);
        }
    }
    if tile.filled() > 0 {
        drain::<S, NR, MV>(tile, &mut scores, &mut done, mp);
    }
    // Partial softmax statistics of each row over this chunk.
    let mut m = vec![f32::NEG_INFINITY; mp];
    let mut l = vec![0f32; mp];
    // SAFETY: every offset is inside `scores` (n rows of mp) or m / l (mp).
    unsafe {
        for c in (0..mp).step_by(S::LANES) {
            let mut mx = S::splat(f32::NEG_INFINITY);
            for j in 0..n {
                mx = S::max(mx, S::load(scores.as_ptr().add(j * mp + c)));
            }
            // A row may see none of this chunk's keys (all masked): keep its sum at 0, not NaN.
            let base = S::max(mx, S::splat(f32::MIN));
            let mut sum = S::zero();
            for j in 0..n {
                sum = S::add(sum, S::exp2(S::sub(S::load(scores.as_ptr().add(j * mp + c)), base)));
            }
            S::store(m.as_mut_ptr().add(c), mx);
            S::store(l.as_mut_ptr().add(c), sum);
        }
    }
    Chunk { scores, m, l }
}

/// Scores the tile's keys and appends them to `scores`. (A function, not a closure: closures
/// are not compiled with the ISA's target features, so intrinsics would not inline.)
#[inline(always)]
fn drain<S: Simd, const NR: usize, const MV: usize>(tile: &mut Tile, scores: &mut [f32], done: &mut usize, mp: usize) {
    let used = tile.filled();
    tile.score::<S, NR, MV>();
    scores[*done * mp..(*done + used) * mp].copy_from_slice(&tile.st[..used * mp]);
    *done += used;
    tile.reset_keys();
}

/// Pass 2 for one chunk: window-mean probabilities `a[g][n]` of the scored positions.
struct MeanJob<'c> {
    chunk: &'c Chunk,
    m: &'c [f32],
    inv_l: &'c [f32],
    mp: usize,
    g: usize,
    w: usize,
    count: usize,
}

impl WithSimd for MeanJob<'_> {
    type Output = Vec<f32>;
    #[inline(always)]
    fn with_simd<S: Simd>(self) -> Vec<f32> {
        let MeanJob { chunk, m, inv_l, mp, g, w, count } = self;
        let mut p = vec![0f32; mp];
        let mut out = vec![0f32; g * count];
        let inv_w = 1.0 / w as f32;
        for j in 0..count {
            // SAFETY: rows of mp values.
            unsafe {
                for c in (0..mp).step_by(S::LANES) {
                    let s = S::load(chunk.scores.as_ptr().add(j * mp + c));
                    let e = S::exp2(S::sub(s, S::load(m.as_ptr().add(c))));
                    S::store(p.as_mut_ptr().add(c), S::mul(e, S::load(inv_l.as_ptr().add(c))));
                }
            }
            for gi in 0..g {
                let mut sum = 0.0;
                for wi in 0..w {
                    sum += p[wi * g + gi];
                }
                out[gi * count + j] = sum * inv_w;
            }
        }
        out
    }
}

pub(crate) fn kv_compress<E: Element>(isa: Isa, lanes: usize, a: &CompressArgs<'_>) -> CompressedCache {
    let d = a.dims();
    let cfg = a.cfg();
    if !d.compresses(cfg) {
        return compress::unchanged(&a.k_cache(), &a.v_cache(), &d);
    }
    let (g, w, n) = (d.group(), d.window, d.entries);
    let scored = n - w;
    let geom = Geom::new(lanes, d.head_dim, g * w);
    let call = Call::<E> {
        obs: Strided::of(&a.obs()),
        k: Strided::of(&a.k_cache()),
        d,
        c: a.scale() * std::f32::consts::LOG2_E,
        geom,
    };
    let mut units = Vec::new();
    for b in 0..d.batch {
        for h in 0..d.kv_heads {
            for k0 in (0..n).step_by(KEYS_PER_UNIT) {
                units.push((b, h, k0..(k0 + KEYS_PER_UNIT).min(n)));
            }
        }
    }
    let chunks: Vec<Chunk> = units
        .par_iter()
        .map_init(
            || (Tile::new::<E>(geom), vec![0f32; d.head_dim]),
            |(tile, tmp), (b, h, keys)| {
                dispatch(isa, ScoreJob { call: &call, b: *b, h: *h, keys: keys.clone(), tile, tmp })
            },
        )
        .collect();

    // Merge each (b, h)'s chunk statistics into the rows' max and 1/sum.
    let per_head = n.div_ceil(KEYS_PER_UNIT);
    let mp = geom.mp;
    let norms: Vec<(Vec<f32>, Vec<f32>)> = chunks
        .chunks(per_head)
        .map(|cs| {
            let m: Vec<f32> = (0..mp).map(|r| cs.iter().map(|c| c.m[r]).fold(f32::NEG_INFINITY, f32::max)).collect();
            let inv_l =
                (0..mp).map(|r| 1.0 / cs.iter().map(|c| c.l[r] * (c.m[r] - m[r]).exp2()).sum::<f32>()).collect();
            (m, inv_l)
        })
        .collect();

    // Pass 2: window means per query head, for the scored positions of every chunk.
    let means: Vec<Vec<f32>> = units
        .par_iter()
        .zip(&chunks)
        .enumerate()
        .map(|(u, ((_, _, keys), chunk))| {
            let (m, inv_l) = &norms[u / per_head];
            let count = keys.end.min(scored).saturating_sub(keys.start);
            dispatch(isa, MeanJob { chunk, m, inv_l, mp, g, w, count })
        })
        .collect();

    // Rows of a[b][hq][n], then the group reduction of SPEC §4.3.
    let heads = d.out_heads(cfg);
    let mut rows: Vec<Vec<f32>> = Vec::with_capacity(d.batch * heads);
    for b in 0..d.batch {
        for h in 0..d.kv_heads {
            let head_units = (b * d.kv_heads + h) * per_head..(b * d.kv_heads + h + 1) * per_head;
            let per_q: Vec<Vec<f32>> = (0..g)
                .map(|gi| {
                    let mut row = Vec::with_capacity(scored);
                    for u in head_units.clone() {
                        let count = means[u].len() / g;
                        row.extend_from_slice(&means[u][gi * count..(gi + 1) * count]);
                    }
                    row
                })
                .collect();
            match cfg.gqa_mode {
                GqaMode::PerQueryHead => rows.extend(per_q),
                GqaMode::Mean => {
                    rows.push((0..scored).map(|i| per_q.iter().map(|r| r[i]).sum::<f32>() / g as f32).collect())
                }
                GqaMode::Max => rows
                    .push((0..scored).map(|i| per_q.iter().map(|r| r[i]).fold(f32::NEG_INFINITY, f32::max)).collect()),
            }
        }
    }
    let pooled: Vec<Vec<f32>> = rows
        .par_iter()
        .map(|r| {
            let mut p = vec![0f32; r.len()];
            compress::pool_row(r, cfg.pooling, cfg.pooling_kernel, &mut p);
            p
        })
        .collect();
    let sel: Vec<Vec<u32>> = pooled.chunks(heads).flat_map(|rows| compress::select_heads(rows, cfg)).collect();
    compress::gather(&a.k_cache(), &a.v_cache(), &d, heads, &sel)
}

//! `kv_compress` on the CPU (SPEC §4). The window's G·W query rows of a kv head are scored
//! against the cache with the tile microkernel in two passes over key chunks: pass 1 keeps only
//! each row's running max and sum (merged over chunks into the softmax normaliser), pass 2
//! recomputes the scores and reduces the normalised probabilities over the window straight into
//! per-query-head means. Recomputing QKᵀ costs less than storing a `[N][G·W]` score matrix (37 MB
//! at 32K tokens and two kv heads, page faults included) and keeps memory flat in N. Group
//! reduction, pooling, selection and the gather follow the shared rules in `crate::compress`.

use rayon::prelude::*;

use super::Strided;
use super::simd::{Isa, Simd, WithSimd, dispatch};
use super::tile::{Geom, Rows, Tile};
use crate::alloc;
use crate::compress::{self, CompressedCache};
use crate::config::{DecodeConfig, GqaMode};
use crate::engine::{KvCache, Scores, SelectArgs};
use crate::error::Result;
use crate::tensor::Element;
use crate::validate::{CompressArgs, CompressDims};

/// Keys per work unit (both passes).
const KEYS_PER_UNIT: usize = 2048;

/// Where the keys of (b, kv head h) are: a strided `[B, Hkv, N, D]` view (every head `N`
/// entries) or a paged cache (each head its own length).
pub(crate) enum Keys<'a, E> {
    Strided(Strided<'a, E>),
    Paged { cache: &'a KvCache<'a>, data: &'a [E] },
}

impl<'a, E: Element> Keys<'a, E> {
    fn rows(&self, b: usize, h: usize) -> Rows<'a, E> {
        match self {
            Keys::Strided(k) => k.rows(b, h, 2),
            Keys::Paged { cache, data } => super::engine::rows(cache, data, b, h),
        }
    }
    /// Entries of (b, h).
    fn entries(&self, d: &CompressDims, b: usize, h: usize) -> usize {
        match self {
            Keys::Strided(_) => d.entries,
            Keys::Paged { cache, .. } => cache.lens()[b * d.kv_heads + h] as usize,
        }
    }
}

struct Call<'a, E> {
    obs: Strided<'a, E>,
    k: Keys<'a, E>,
    d: CompressDims,
    c: f32,
    geom: Geom,
}

/// What a pass does with each scored tile.
enum Pass<'c> {
    /// Per-row running max and sum (base 2) over the unit's keys.
    Stats { m: Vec<f32>, l: Vec<f32> },
    /// Window means `a[g][n]` for the unit's scored positions, given the rows' global max and
    /// 1/sum (zero for padding rows).
    Means { m: &'c [f32], inv_l: &'c [f32], out: Vec<f32> },
}

struct UnitJob<'a, 'c, 'p, E> {
    call: &'c Call<'a, E>,
    b: usize,
    h: usize,
    keys: std::ops::Range<usize>,
    tile: &'c mut Tile,
    tmp: &'c mut Vec<f32>,
    pass: Pass<'p>,
}

impl<'p, E: Element> WithSimd for UnitJob<'_, '_, 'p, E> {
    type Output = Pass<'p>;
    #[inline(always)]
    fn with_simd<S: Simd>(self) -> Pass<'p> {
        if S::LANES >= 16 { run_unit::<S, E, 8, 3>(self) } else { run_unit::<S, E, 4, 3>(self) }
    }
}

#[inline(always)]
fn run_unit<'p, S: Simd, E: Element, const NR: usize, const MV: usize>(job: UnitJob<'_, '_, 'p, E>) -> Pass<'p> {
    let UnitJob { call, b, h, keys, tile, tmp, mut pass } = job;
    let d = call.d;
    let (g, w, dd) = (d.group(), d.window, d.head_dim);
    let n = call.k.entries(&d, b, h);
    // Window query wi is aligned with cache entry N - W + wi: later entries are masked.
    tile.begin(n - w, g);
    for wi in 0..w {
        for j in 0..g {
            tile.set_query(wi * g + j, call.obs.row(b, h * g + j, wi, dd), call.c, tmp);
        }
    }
    tile.clear_queries(w * g);
    let k = call.k.rows(b, h);
    let first = keys.start;
    for (t, o) in k.walk_prefetched(keys, dd) {
        tile.push_key(k.at(o, dd), t);
        if tile.is_full() {
            consume::<S, NR, MV>(tile, &mut pass, first, n - w, g, w);
        }
    }
    if tile.filled() > 0 {
        consume::<S, NR, MV>(tile, &mut pass, first, n - w, g, w);
    }
    pass
}

/// Scores the tile's keys and folds them into the pass. A function, not a closure: closures are
/// not compiled with the ISA's target features.
#[inline(always)]
fn consume<S: Simd, const NR: usize, const MV: usize>(
    tile: &mut Tile,
    pass: &mut Pass<'_>,
    first: usize,
    scored: usize,
    g: usize,
    w: usize,
) {
    let n = tile.filled();
    let t0 = tile.first_token();
    tile.score::<S, NR, MV>();
    let mp = tile.g.mp;
    let st = tile.st.as_ptr();
    // SAFETY: Sᵀ holds n rows of mp values; m, l, inv_l hold mp values.
    unsafe {
        match pass {
            Pass::Stats { m, l } => {
                for c in (0..mp).step_by(S::LANES) {
                    let m_old = S::load(m.as_ptr().add(c));
                    let mut mx = m_old;
                    for j in 0..n {
                        mx = S::max(mx, S::load(st.add(j * mp + c)));
                    }
                    // A row may see none of these keys (all masked): keep its sum at 0, not NaN.
                    let base = S::max(mx, S::splat(f32::MIN));
                    let mut sum = S::zero();
                    for j in 0..n {
                        sum = S::add(sum, S::exp2(S::sub(S::load(st.add(j * mp + c)), base)));
                    }
                    let l_old = S::mul(S::load(l.as_ptr().add(c)), S::exp2(S::sub(m_old, base)));
                    S::store(l.as_mut_ptr().add(c), S::add(l_old, sum));
                    S::store(m.as_mut_ptr().add(c), mx);
                }
            }
            Pass::Means { m, inv_l, out } => {
                let count = out.len() / g;
                let inv_w = 1.0 / w as f32;
                // Row r = wi·G + gi sits in lane r mod LANES: when LANES is a multiple of G, lane
                // l only ever holds rows of query head l mod G, so the window sum is vertical.
                let vertical = S::LANES % g == 0;
                let mut lanes = [0f32; 16];
                for j in 0..n {
                    let t = t0 + j;
                    if t >= scored {
                        break;
                    }
                    let col = t - first;
                    if vertical {
                        let mut acc = S::zero();
                        for c in (0..mp).step_by(S::LANES) {
                            let e = S::exp2(S::sub(S::load(st.add(j * mp + c)), S::load(m.as_ptr().add(c))));
                            acc = S::fma(e, S::load(inv_l.as_ptr().add(c)), acc);
                        }
                        S::store(lanes.as_mut_ptr(), acc);
                        for gi in 0..g {
                            out[gi * count + col] = (gi..S::LANES).step_by(g).map(|i| lanes[i]).sum::<f32>() * inv_w;
                        }
                    } else {
                        for gi in 0..g {
                            let mut sum = 0.0;
                            for wi in 0..w {
                                let r = wi * g + gi;
                                sum += (*st.add(j * mp + r) - m[r]).exp2() * inv_l[r];
                            }
                            out[gi * count + col] = sum * inv_w;
                        }
                    }
                }
            }
        }
    }
    tile.reset_keys();
}

type Unit = (usize, usize, std::ops::Range<usize>);

/// Runs one pass over every unit in parallel from the units' initial states (allocated by the
/// caller, fallibly: together they grow as heads × entries).
fn run_pass<'p, E: Element>(isa: Isa, call: &Call<'_, E>, units: &[Unit], passes: Vec<Pass<'p>>) -> Vec<Pass<'p>> {
    units
        .par_iter()
        .zip(passes.into_par_iter())
        .map_init(
            || (Tile::new::<E>(call.geom), vec![0f32; call.d.head_dim]),
            |(tile, tmp), ((b, h, keys), pass)| {
                dispatch(isa, UnitJob { call, b: *b, h: *h, keys: keys.clone(), tile, tmp, pass })
            },
        )
        .collect()
}

pub(crate) fn kv_compress<E: Element>(isa: Isa, lanes: usize, a: &CompressArgs<'_>) -> Result<CompressedCache> {
    let d = a.dims();
    let cfg = a.cfg();
    if !d.compresses(cfg) {
        return compress::unchanged(&a.k_cache(), &a.v_cache(), &d);
    }
    let keys = Keys::Strided(Strided::of(&a.k_cache()));
    let pooled =
        pooled_rows::<E>(isa, lanes, keys, Strided::of(&a.obs()), d, cfg, a.scale(), &[true; 1].repeat(d.batch))?;
    compress::select_and_gather(a, &pooled)
}

/// SPEC §4 steps 1–4 on the CPU: the pooled score rows `[B][out heads]` (each head's `N - W`
/// scored positions) of the batch rows `which` (others get no rows). `d.entries` is the longest
/// head's length; each head scores its own.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pooled_rows<E: Element>(
    isa: Isa,
    lanes: usize,
    keys: Keys<'_, E>,
    obs: Strided<'_, E>,
    d: CompressDims,
    cfg: &DecodeConfig,
    scale: f32,
    which: &[bool],
) -> Result<Vec<Vec<f32>>> {
    let (g, w) = (d.group(), d.window);
    let geom = Geom::new(lanes, d.head_dim, g * w);
    let mp = geom.mp;
    // Each worker's tile holds G·W rows (Qᵀ, Sᵀ, Oᵀ): a multiple of the window tensor.
    alloc::probe::<f32>("the scoring tiles", &[rayon::current_num_threads(), geom.keys + 2 * geom.dp, mp])?;
    let call = Call::<E> { obs, k: keys, d, c: scale * std::f32::consts::LOG2_E, geom };
    // Units per (b, h) over its own entries; `heads[bh]` their range in `units`.
    let mut units: Vec<Unit> = Vec::new();
    let mut heads: Vec<std::ops::Range<usize>> = Vec::with_capacity(d.batch * d.kv_heads);
    for bh in 0..d.batch * d.kv_heads {
        let (b, h) = (bh / d.kv_heads, bh % d.kv_heads);
        let start = units.len();
        if which[b] {
            let n = call.k.entries(&d, b, h);
            units.extend((0..n).step_by(KEYS_PER_UNIT).map(|k0| (b, h, k0..(k0 + KEYS_PER_UNIT).min(n))));
        }
        heads.push(start..units.len());
    }
    // Pass 1: per-row max and sum per unit, merged per (b, h) into max and 1/sum.
    // Per unit and window row: max and sum (units × G·W: cache length times window rows).
    alloc::probe::<f32>("the scoring statistics", &[units.len(), mp, 2])?;
    let stats0 = units
        .iter()
        .map(|_| {
            Ok(Pass::Stats {
                m: alloc::filled("the scoring maxima", mp, f32::NEG_INFINITY)?,
                l: alloc::filled("the scoring sums", mp, 0.0)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let stats = run_pass(isa, &call, &units, stats0);
    let norms: Vec<(Vec<f32>, Vec<f32>)> = heads
        .iter()
        .map(|range| {
            let parts: Vec<(&[f32], &[f32])> = stats[range.clone()]
                .iter()
                .map(|p| match p {
                    Pass::Stats { m, l } => (m.as_slice(), l.as_slice()),
                    Pass::Means { .. } => unreachable!("pass 1 yields stats"),
                })
                .collect();
            let m: Vec<f32> = (0..mp).map(|r| parts.iter().map(|p| p.0[r]).fold(f32::NEG_INFINITY, f32::max)).collect();
            let inv_l = (0..mp)
                .map(|r| {
                    if r >= g * w {
                        return 0.0; // padding rows contribute nothing
                    }
                    let base = m[r].max(f32::MIN);
                    1.0 / parts.iter().map(|p| p.1[r] * (p.0[r].max(f32::MIN) - base).exp2()).sum::<f32>()
                })
                .collect();
            (m, inv_l)
        })
        .collect();

    // Pass 2: window means of the scored positions.
    // Window means [G][count] of every unit: Hq × entries in all, which can exceed the inputs.
    alloc::probe::<f32>("the window means", &[d.batch, d.q_heads, d.entries])?;
    let mut means0 = Vec::with_capacity(units.len());
    for (bh, range) in heads.iter().enumerate() {
        let (m, inv_l) = &norms[bh];
        for (b, h, keys) in &units[range.clone()] {
            let scored = call.k.entries(&d, *b, *h) - w;
            let count = keys.end.min(scored).saturating_sub(keys.start);
            means0.push(Pass::Means { m, inv_l, out: alloc::filled("the window means", g * count, 0.0)? });
        }
    }
    let means = run_pass(isa, &call, &units, means0);

    // Rows a[b][hq][n], then the group reduction of SPEC §4.3.
    let out_heads = d.out_heads(cfg);
    let row = |len: usize, values: &mut dyn Iterator<Item = f32>| -> Result<Vec<f32>> {
        let mut r = alloc::with_capacity("a decode score row", len)?;
        r.extend(values);
        Ok(r)
    };
    // Rows and pooled rows are built one by one: check the whole first (Hq rows for per_query_head).
    alloc::probe::<f32>("the decode score rows", &[d.batch, out_heads, d.entries, 2])?;
    let mut rows: Vec<Vec<f32>> = alloc::with_capacity("the decode score rows", d.batch * out_heads)?;
    for (bh, range) in heads.iter().enumerate() {
        let head_units = &means[range.clone()];
        let scored = call.k.entries(&d, bh / d.kv_heads, bh % d.kv_heads).saturating_sub(w);
        let scored = if which[bh / d.kv_heads] { scored } else { 0 };
        let per_q: Vec<Vec<f32>> = (0..g)
            .map(|gi| {
                row(
                    scored,
                    &mut head_units.iter().flat_map(|p| {
                        let Pass::Means { out, .. } = p else { unreachable!("pass 2 yields means") };
                        let count = out.len() / g;
                        out[gi * count..(gi + 1) * count].iter().copied()
                    }),
                )
            })
            .collect::<Result<_>>()?;
        match cfg.gqa_mode {
            GqaMode::PerQueryHead => rows.extend(per_q),
            GqaMode::Mean => {
                rows.push(row(scored, &mut (0..scored).map(|i| per_q.iter().map(|r| r[i]).sum::<f32>() / g as f32))?)
            }
            GqaMode::Max => rows.push(row(
                scored,
                &mut (0..scored).map(|i| per_q.iter().map(|r| r[i]).fold(f32::NEG_INFINITY, f32::max)),
            )?),
        }
    }
    drop(means);
    let mut pooled: Vec<Vec<f32>> =
        rows.iter().map(|r| alloc::filled("the pooled scores", r.len(), 0f32)).collect::<Result<_>>()?;
    pooled.par_iter_mut().zip(&rows).for_each(|(p, r)| compress::pool_row(r, cfg.pooling, cfg.pooling_kernel, p));
    Ok(pooled)
}

/// The pooled scores over a (paged or contiguous) cache (SPEC §7.5): the compressing
/// sequences' rows, each head over its own entries.
pub(crate) fn scores<E: Element>(isa: Isa, lanes: usize, a: &SelectArgs<'_>) -> Result<Scores> {
    let cache = a.cache();
    let keys = Keys::Paged { cache, data: cache.k().typed::<E>().expect("dtype checked by validation") };
    let pooled = pooled_rows::<E>(isa, lanes, keys, Strided::of(&a.obs()), a.dims(), a.cfg(), a.scale(), a.compress())?;
    Ok(Scores::of(a, pooled))
}

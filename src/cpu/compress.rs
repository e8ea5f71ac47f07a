//! `kv_compress` on the CPU (SPEC §4). The window's G·W query rows of a kv head are scored
//! against the cache with the tile microkernel in two passes over key chunks: pass 1 keeps only
//! each row's running max and sum (merged over chunks into the softmax normaliser), pass 2
//! recomputes the scores and reduces the normalised probabilities over the window straight into
//! per-query-head means. Recomputing QKᵀ costs less than storing a `[N][G·W]` score matrix (37 MB
//! at 32K tokens and two kv heads, page faults included) and keeps memory flat in N. Group
//! reduction, pooling, selection and the gather follow the shared rules in `crate::compress`.
//! A work unit is a key range of a group of heads, read slot by slot (see [`UnitJob`]).

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

/// One unit: the keys `keys` of the heads `heads` of sequence `b`, each head into its own tile
/// and pass. Keys are pushed slot by slot (every head's row of key `t`, then `t + 1`), so a
/// slot-major page (`[page, H, D]` per slot) is read in address order, as the split-K decode
/// reads it; each head's tiles see the same keys in the same order as a head-at-a-time scan, so
/// the scores do not depend on the grouping.
struct UnitJob<'a, 'c, 'p, E> {
    call: &'c Call<'a, E>,
    unit: &'c Unit,
    tiles: &'c mut [Tile],
    tmp: &'c mut Vec<f32>,
    passes: Vec<Pass<'p>>,
}

impl<'p, E: Element> WithSimd for UnitJob<'_, '_, 'p, E> {
    type Output = Vec<Pass<'p>>;
    #[inline(always)]
    fn with_simd<S: Simd>(self) -> Vec<Pass<'p>> {
        if S::LANES >= 16 { run_unit::<S, E, 8, 3>(self) } else { run_unit::<S, E, 4, 3>(self) }
    }
}

#[inline(always)]
fn run_unit<'p, S: Simd, E: Element, const NR: usize, const MV: usize>(job: UnitJob<'_, '_, 'p, E>) -> Vec<Pass<'p>> {
    let UnitJob { call, unit, tiles, tmp, mut passes } = job;
    let d = call.d;
    let (g, w, dd) = (d.group(), d.window, d.head_dim);
    let Unit { b, ref heads, ref keys } = *unit;
    let first = keys.start;
    let mut scans = Vec::with_capacity(heads.len());
    for (h, tile) in heads.clone().zip(tiles.iter_mut()) {
        let n = call.k.entries(&d, b, h);
        // Window query wi is aligned with cache entry N - W + wi: later entries are masked.
        tile.begin(n - w, g);
        for wi in 0..w {
            for j in 0..g {
                tile.set_query::<S, E>(wi * g + j, call.obs.row(b, h * g + j, wi, dd), call.c, tmp);
            }
        }
        tile.clear_queries(w * g);
        let k = call.k.rows(b, h);
        scans.push((k, k.walk_prefetched(keys.start.min(n)..keys.end.min(n), dd), n - w));
    }
    for _ in keys.clone() {
        for ((k, walk, scored), (tile, pass)) in scans.iter_mut().zip(tiles.iter_mut().zip(passes.iter_mut())) {
            let Some((t, o)) = walk.next() else { continue };
            tile.push_key::<S, E>(k.at(o, dd), t);
            if tile.is_full() {
                consume::<S, NR, MV>(tile, pass, first, *scored, g, w);
            }
        }
    }
    for ((_, _, scored), (tile, pass)) in scans.iter().zip(tiles.iter_mut().zip(passes.iter_mut())) {
        if tile.filled() > 0 {
            consume::<S, NR, MV>(tile, pass, first, *scored, g, w);
        }
    }
    passes
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

/// The keys `keys` of heads `heads` of sequence `b` (heads shorter than `keys.end` take their
/// part of it).
struct Unit {
    b: usize,
    heads: std::ops::Range<usize>,
    keys: std::ops::Range<usize>,
}

/// Tile memory a worker may hold for one unit's heads: their Qᵀ/Sᵀ stay in L2 between the keys.
const UNIT_TILE_BYTES: usize = 1 << 20;

/// A scorer's tile: bf16 scores on AMX where the ISA is `Amx`, the f32 kernels otherwise.
fn scoring_tile<E: Element>(isa: Isa, geom: super::tile::Geom) -> Tile {
    let tile = Tile::new::<E>(geom);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Amx && E::DTYPE == crate::DType::BF16 {
        return tile.with_amx_scores::<E>();
    }
    let _ = isa;
    tile
}

/// Runs one pass over every unit in parallel from the units' initial states (one per head of the
/// unit, allocated by the caller, fallibly: together they grow as heads × entries).
fn run_pass<'p, E: Element>(
    isa: Isa,
    call: &Call<'_, E>,
    units: &[Unit],
    passes: Vec<Vec<Pass<'p>>>,
) -> Vec<Vec<Pass<'p>>> {
    let heads = units.iter().map(|u| u.heads.len()).max().unwrap_or(0);
    units
        .par_iter()
        .zip(passes.into_par_iter())
        .map_init(
            || ((0..heads).map(|_| scoring_tile::<E>(isa, call.geom)).collect::<Vec<_>>(), vec![0f32; call.d.head_dim]),
            |(tiles, tmp), (unit, passes)| dispatch(isa, UnitJob { call, unit, tiles, tmp, passes }),
        )
        .collect()
}

/// Each (b, h)'s passes in key order, those of units past the head's entries left out.
fn by_head<'p, E: Element>(call: &Call<'_, E>, units: &[Unit], passes: Vec<Vec<Pass<'p>>>) -> Vec<Vec<Pass<'p>>> {
    let d = &call.d;
    let mut per: Vec<Vec<Pass<'p>>> = (0..d.batch * d.kv_heads).map(|_| Vec::new()).collect();
    for (u, unit_passes) in units.iter().zip(passes) {
        for (h, p) in u.heads.clone().zip(unit_passes) {
            if u.keys.start < call.k.entries(d, u.b, h) {
                per[u.b * d.kv_heads + h].push(p);
            }
        }
    }
    per
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
    let geom = Geom::new(lanes, d.head_dim, d.group() * d.window);
    let group = (UNIT_TILE_BYTES / (4 * tile_floats(&geom))).clamp(1, d.kv_heads.max(1));
    pooled_rows_grouped(isa, keys, obs, d, cfg, scale, which, geom, group)
}

/// Floats of one scoring tile (Qᵀ, Sᵀ, Oᵀ of G·W rows).
fn tile_floats(geom: &Geom) -> usize {
    (geom.keys + 2 * geom.dp) * geom.mp
}

/// [`pooled_rows`] with units over `group` heads at a time (the scores do not depend on it).
#[allow(clippy::too_many_arguments)]
fn pooled_rows_grouped<E: Element>(
    isa: Isa,
    keys: Keys<'_, E>,
    obs: Strided<'_, E>,
    d: CompressDims,
    cfg: &DecodeConfig,
    scale: f32,
    which: &[bool],
    geom: Geom,
    group: usize,
) -> Result<Vec<Vec<f32>>> {
    let (g, w) = (d.group(), d.window);
    let mp = geom.mp;
    // Units over key ranges of a group of heads of one sequence; each worker holds one tile of
    // G·W rows per head of the group.
    let tile_floats = tile_floats(&geom);
    alloc::probe::<f32>("the scoring tiles", &[rayon::current_num_threads(), group, tile_floats])?;
    let call = Call::<E> { obs, k: keys, d, c: scale * std::f32::consts::LOG2_E, geom };
    let mut units: Vec<Unit> = Vec::new();
    for b in (0..d.batch).filter(|&b| which[b]) {
        for h0 in (0..d.kv_heads).step_by(group) {
            let heads = h0..(h0 + group).min(d.kv_heads);
            let n = heads.clone().map(|h| call.k.entries(&d, b, h)).max().unwrap_or(0);
            units.extend((0..n).step_by(KEYS_PER_UNIT).map(|k0| Unit {
                b,
                heads: heads.clone(),
                keys: k0..(k0 + KEYS_PER_UNIT).min(n),
            }));
        }
    }
    // Pass 1: per-row max and sum per unit and head, merged per (b, h) into max and 1/sum.
    // Per unit, head and window row: max and sum (cache length times window rows).
    alloc::probe::<f32>("the scoring statistics", &[units.len(), group, mp, 2])?;
    let stats0 = units
        .iter()
        .map(|u| {
            u.heads
                .clone()
                .map(|_| {
                    Ok(Pass::Stats {
                        m: alloc::filled("the scoring maxima", mp, f32::NEG_INFINITY)?,
                        l: alloc::filled("the scoring sums", mp, 0.0)?,
                    })
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    let stats = by_head(&call, &units, run_pass(isa, &call, &units, stats0));
    let norms: Vec<(Vec<f32>, Vec<f32>)> = stats
        .iter()
        .map(|head| {
            let parts: Vec<(&[f32], &[f32])> = head
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
    drop(stats);

    // Pass 2: window means of the scored positions.
    // Window means [G][count] of every unit: Hq × entries in all, which can exceed the inputs.
    alloc::probe::<f32>("the window means", &[d.batch, d.q_heads, d.entries])?;
    let means0 = units
        .iter()
        .map(|u| {
            u.heads
                .clone()
                .map(|h| {
                    let (m, inv_l) = &norms[u.b * d.kv_heads + h];
                    let scored = call.k.entries(&d, u.b, h).saturating_sub(w);
                    let count = u.keys.end.min(scored).saturating_sub(u.keys.start);
                    Ok(Pass::Means { m, inv_l, out: alloc::filled("the window means", g * count, 0.0)? })
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    let means = by_head(&call, &units, run_pass(isa, &call, &units, means0));

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
    for (bh, head_units) in means.iter().enumerate() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth;
    use crate::tensor::HostTensor;
    use half::bf16;

    /// Units over one head, two heads or all heads give bit-identical scores: each head's tiles
    /// see the same keys in the same order whatever the grouping (planting a head offset by one in
    /// `run_unit`'s queries fails it).
    #[test]
    fn scores_do_not_depend_on_the_head_grouping() {
        let (hkv, g, w, n, dd) = (5, 2, 8, KEYS_PER_UNIT + 777, 64);
        let k = HostTensor::from_f32(&synth::normal(hkv * n * dd, 1.0, 11), [1, hkv, n, dd], crate::DType::BF16);
        let obs =
            HostTensor::from_f32(&synth::normal(hkv * g * w * dd, 1.0, 12), [1, hkv * g, w, dd], crate::DType::BF16);
        let d = CompressDims { batch: 1, kv_heads: hkv, q_heads: hkv * g, entries: n, window: w, head_dim: dd };
        let cfg = DecodeConfig { gqa_mode: GqaMode::PerQueryHead, decode_budget: 512, ..DecodeConfig::snapkv() };
        let isa = Isa::detect();
        let lanes = if matches!(isa, Isa::Amx | Isa::Avx512Bf16 | Isa::Avx512) { 16 } else { 8 };
        let geom = Geom::new(lanes, dd, g * w);
        let run = |group| {
            let keys = Keys::Strided(Strided::<bf16>::of(&k.view()));
            pooled_rows_grouped(isa, keys, Strided::of(&obs.view()), d, &cfg, 0.125, &[true], geom, group).unwrap()
        };
        let one = run(1);
        assert_eq!(one.len(), hkv * g);
        assert!(one.iter().all(|r| r.len() == n - w && r.iter().all(|x| x.is_finite())));
        for group in [2, hkv] {
            let other = run(group);
            for (a, b) in one.iter().zip(&other) {
                assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "group {group}");
            }
        }
    }
}

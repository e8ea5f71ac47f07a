//! Planning on the CPU (SPEC §2). Representatives are max/min in f32 (exact); logits, the
//! distribution and the entropy are computed in f64 with [`crate::numerics`]' operations and
//! summation orders, which the device kernels share bit for bit — the logits' dot products in the
//! inputs' [`LogitPrecision`] (f32 `numerics::dot32` for 16-bit inputs); budgets and keep counts
//! use the shared rules.

use rayon::prelude::*;

use super::plan_logits::{KEYS32, KeyTiles, PackedRows, PackedRows32, TILE_KEYS, key_tiles, rows32};
use super::plan_reps::{Scratch, key_tile, representatives};
use super::simd::{Isa, KeepSubnormals, Simd, WithSimd, dispatch};
use super::simd_f64::F64x8;
use crate::alloc;
use crate::config::EntropyConfig;
use crate::engine::args::ChunkSettings;
use crate::engine::{ChunkArgs, SeqChunk};
use crate::error::Result;
use crate::numerics::{self, LogitPrecision};
use crate::plan::{BlockLists, Plan, PlanDims, PlanState, rules};
use crate::tensor::{DType, Element};
use crate::validate::PlanArgs;

/// Where unit (b, h, s) writes: its rows of the logit and score maps (empty when not kept) and
/// its ranking prefix. The maps grow as L², so they are allocated once, fallibly, by the caller.
struct UnitOut<'o> {
    logits: &'o mut [f32],
    scores: &'o mut [f32],
    ranked: &'o mut [u32],
}

/// Planned segments of one (sequence, kv head) per task: they share every key tile while it is
/// in L1, so the key representatives stream from memory once per task, not once per segment.
const SEGMENTS_PER_TASK: usize = 32;

/// Consecutive planned units (same sequence and kv head) planned together: their logits tile by
/// tile over the shared key tiles, then each unit's distribution, entropy and ranking.
struct GroupJob<'a, 'o> {
    dims: PlanDims,
    head_dim: usize,
    /// `[B][segments planned][Hq]` sums `qmax + qmin` (f64, exact).
    qsum: &'a [f64],
    /// The first segment planned and how many are.
    first: usize,
    planned: usize,
    /// The key tiles of [`key_tiles`], laid out for `precision`.
    kt: &'a KeyTiles,
    precision: LogitPrecision,
    prev: Option<&'a [f32]>,
    /// The units `(u, out)`, ascending segments of one (b, kv head).
    units: Vec<(usize, UnitOut<'o>)>,
    /// A worker's buffer for the units' logits, reused from group to group.
    logits: &'a mut Vec<f64>,
}

impl WithSimd for GroupJob<'_, '_> {
    /// The units' entropies.
    type Output = Vec<f64>;
    #[inline(always)]
    fn with_simd<S: Simd>(self) -> Vec<f64> {
        let _exact = KeepSubnormals::new(); // the decisions round as every backend's
        let GroupJob { dims: d, head_dim: dd, qsum, kt, precision, first, planned, prev, units, logits } = self;
        let g = d.group();
        let bh = units[0].0 / d.segments;
        let (b, h) = (bh / d.kv_heads, bh % d.kv_heads);
        let lims: Vec<usize> = units.iter().map(|(u, _)| d.causal_limit(u % d.segments)).collect();
        debug_assert!(lims.is_sorted(), "ascending segments see ascending blocks");
        // The query rows, unit by unit, its group's heads in order.
        let qrows: Vec<&[f64]> = units
            .iter()
            .flat_map(|(u, _)| {
                let s = u % d.segments;
                (0..g).map(move |gi| &qsum[((b * planned + s - first) * d.q_heads + h * g + gi) * dd..][..dd])
            })
            .collect();
        // Unit k's logits at `starts[k]..starts[k + 1]`, its `lim` candidates only; the kernels
        // write every one of them, so the buffer is not cleared between groups (poisoned in debug
        // builds, where a value left unwritten would show).
        let mut starts = Vec::with_capacity(lims.len() + 1);
        starts.push(0);
        for &lim in &lims {
            starts.push(starts[starts.len() - 1] + lim);
        }
        let total = starts[lims.len()];
        if logits.len() < total {
            logits.resize(total, 0.0);
        }
        if cfg!(debug_assertions) {
            logits[..total].fill(f64::NAN);
        }
        let job = GroupLogits { kt, b, h, g, lims: &lims, starts: &starts, qrows: &qrows };
        match precision {
            LogitPrecision::F64 => logits64::<S>(&job, logits),
            LogitPrecision::F32 => logits32::<S>(&job, logits),
        }
        // A loop, not `map`: a closure would compile without the entry point's target features.
        let mut entropies = Vec::with_capacity(units.len());
        let mut rows = UnitRows::default();
        for ((u, out), (k, lim)) in units.into_iter().zip(lims.into_iter().enumerate()) {
            let logit = &logits[starts[k]..starts[k + 1]];
            entropies.push(unit_rest::<S::F64x8>(&d, u, lim, logit, prev, out, &mut rows));
        }
        entropies
    }
}

/// What a group's logits are made of: the key tiles, the group's sequence `b` and kv head `h`, the
/// group size `g`, the units' causal limits `lims` (ascending), where their rows of logits start
/// (`starts`, each row `lim` long) and their group heads' `qmax + qmin` rows, unit by unit.
#[derive(Clone, Copy)]
struct GroupLogits<'a> {
    kt: &'a KeyTiles,
    b: usize,
    h: usize,
    g: usize,
    lims: &'a [usize],
    starts: &'a [usize],
    qrows: &'a [&'a [f64]],
}

/// The logits of a group's units into their rows of `logits` (`starts`), in f64 by `numerics::dot` (bit for
/// bit): tile by tile, the units that see a tile in one micro-kernel pass.
#[inline(always)]
fn logits64<S: Simd>(job: &GroupLogits<'_>, logits: &mut [f64]) {
    let GroupLogits { kt, b, h, g, lims, starts, qrows } = *job;
    let per_call = S::F64x8::ROWS;
    let mut dots = vec![[[0f64; TILE_KEYS]; 2]; qrows.len().next_multiple_of(per_call)];
    let (mut packed, mut packed_from) = (PackedRows::default(), None);
    for t in 0..lims.last().copied().unwrap_or(0).div_ceil(TILE_KEYS) {
        let tile = kt.tile(b, h, t);
        let j0 = t * TILE_KEYS;
        // The units that see this tile: a suffix, as limits ascend; their rows repacked when
        // it shrinks (at most once per unit).
        let active = lims.partition_point(|&lim| lim <= j0);
        if packed_from != Some(active) {
            packed.pack(&qrows[active * g..], per_call);
            packed_from = Some(active);
        }
        packed.tile_dots::<S::F64x8>(kt, tile, &mut dots);
        for (k, unit_dots) in (active..lims.len()).zip(dots.chunks(g)) {
            let mut sum = [0f64; TILE_KEYS];
            for [mx, mn] in unit_dots {
                for l in 0..TILE_KEYS {
                    sum[l] += 0.5 * mx[l].max(mn[l]);
                }
            }
            let row = &mut logits[starts[k] + j0..starts[k] + lims[k]];
            for (x, sum) in row.iter_mut().zip(sum) {
                *x = sum / g as f64;
            }
        }
    }
}

/// The f64 lanes of ISA `S`.
type V<S> = <S as Simd>::F64x8;

/// [`logits64`] for 16-bit inputs: the dot products in f32 by `numerics::dot32` (bit for bit),
/// two tiles per micro-kernel pass; each unit's logit the group mean, in f64, of
/// `0.5·max(dot(row, kmax), dot(row, kmin))` as in f64.
#[inline(always)]
fn logits32<S: Simd>(job: &GroupLogits<'_>, logits: &mut [f64]) {
    let GroupLogits { kt, b, h, g, lims, starts, qrows } = *job;
    const PAIR: usize = 2 * TILE_KEYS;
    let per_call = rows32::<S>();
    // Each row `qmax + qmin`, summed in f64, rounded to f32: the f32 sum's bits (`numerics::dot32`).
    let narrow: Vec<f32> = qrows.iter().flat_map(|r| r.iter().map(|&x| x as f32)).collect();
    let dd = qrows.first().map_or(0, |r| r.len());
    let rows32: Vec<&[f32]> = narrow.chunks(dd.max(1)).collect();
    let mut dots = vec![[0f32; KEYS32]; rows32.len().next_multiple_of(per_call)];
    let zero_tile = vec![0f32; 2 * dd * TILE_KEYS];
    let tiles = kt.tiles();
    let (mut packed, mut packed_from) = (PackedRows32::default(), None);
    for t in (0..lims.last().copied().unwrap_or(0).div_ceil(TILE_KEYS)).step_by(2) {
        let j0 = t * TILE_KEYS;
        let active = lims.partition_point(|&lim| lim <= j0);
        if packed_from != Some(active) {
            packed.pack(&rows32[active * g..], per_call);
            packed_from = Some(active);
        }
        let second = if t + 1 < tiles { kt.tile(b, h, t + 1) } else { &zero_tile[..] };
        packed.tile_dots::<S>([kt.tile(b, h, t), second], &mut dots);
        for (k, unit_dots) in (active..lims.len()).zip(dots.chunks(g)) {
            // Per tile (eight keys, a vector of f64 lanes): Σ over the group's rows of
            // 0.5·max(kmax dot, kmin dot), then / g — lane by lane the f64 path's operations.
            for (t, j) in (j0..lims[k]).step_by(TILE_KEYS).take(2).enumerate() {
                // SAFETY: a row holds KEYS32 = 2·PAIR dots and t < 2: the eight f32s read from
                // `row[t·PAIR]` and `row[t·PAIR + 8]` are in it; the ISA is `dispatch`'s.
                let x = unsafe {
                    let mut sum = V::<S>::zero();
                    for row in unit_dots {
                        let at = row.as_ptr().add(t * PAIR);
                        let (mx, mn) = (V::<S>::load_f32(at), V::<S>::load_f32(at.add(TILE_KEYS)));
                        sum = V::<S>::add(sum, V::<S>::mul(V::<S>::splat(0.5), V::<S>::max_num(mx, mn)));
                    }
                    let mut x = [0f64; TILE_KEYS];
                    V::<S>::store(x.as_mut_ptr(), V::<S>::div(sum, V::<S>::splat(g as f64)));
                    x
                };
                let row = &mut logits[starts[k] + j..starts[k] + lims[k].min(j + TILE_KEYS)];
                row.copy_from_slice(&x[..row.len()]);
            }
        }
    }
}

/// A unit's rows, reused from unit to unit (a fresh row of a long prompt is a fresh mapping:
/// page faults on every unit).
#[derive(Default)]
struct UnitRows {
    p: Vec<f64>,
    terms: Vec<f64>,
    ranking: Vec<u128>,
}

/// A unit's distribution over its logits (`lim` candidate blocks), fused with the previous
/// layer's when given, its entropy (returned) and ranking, and its map rows when kept.
#[inline(always)]
fn unit_rest<V: F64x8>(
    d: &PlanDims,
    u: usize,
    lim: usize,
    logit: &[f64],
    prev: Option<&[f32]>,
    out: UnitOut<'_>,
    rows: &mut UnitRows,
) -> f64 {
    let n = d.blocks;
    let UnitRows { p, terms, ranking } = rows;
    // numerics' exp, ln and summation order: the device kernels compute the same bits.
    p.clear();
    p.resize(n, 0.0);
    if u.is_multiple_of(d.segments) {
        p.fill(1.0 / n as f64);
    } else {
        // Any order of comparisons finds `fold(f64::max)`'s maximum: NaN logits are skipped as
        // there, and a ±0 maximum shifts every logit to the same bits.
        let mut lanes = [f64::NEG_INFINITY; 8];
        for chunk in logit[..lim].chunks(8) {
            for (m, &x) in lanes.iter_mut().zip(chunk) {
                *m = if x > *m { x } else { *m };
            }
        }
        let m = lanes.into_iter().fold(f64::NEG_INFINITY, f64::max);
        // `l − m` as `l + (−m)`: IEEE defines subtraction so, the same bits.
        let (whole, neg_m) = (lim / 8 * 8, -m);
        // SAFETY: i + 8 ≤ whole ≤ lim ≤ both rows' lengths; the ISA is `dispatch`'s.
        unsafe {
            for i in (0..whole).step_by(8) {
                let x = V::add(V::load(logit.as_ptr().add(i)), V::splat(neg_m));
                V::store(p.as_mut_ptr().add(i), V::exp(x));
            }
        }
        for (p, &l) in p[whole..lim].iter_mut().zip(&logit[whole..lim]) {
            *p = numerics::exp(l - m);
        }
        let row = &p[..lim];
        let z = numerics::lane_sum(lim, |j| row[j]);
        for x in &mut p[..lim] {
            *x /= z;
        }
    }
    if let Some(prev) = prev {
        let row = &prev[u * n..][..n];
        p.iter_mut().zip(row).for_each(|(x, &q)| *x = 0.25 * q as f64 + 0.75 * *x);
    }
    // A zero probability adds −0 to its lane (lanes start at +0 and never hold −0: an exact
    // cancellation rounds to +0), which changes no bit: its term is 0, and the blocks past the
    // causal limit need no logarithm nor a place in the sum — unless fusion or segment 0's
    // uniform row fills them.
    let live = if prev.is_some() || u.is_multiple_of(d.segments) { n } else { lim };
    terms.clear();
    terms.resize(live, 0.0);
    for (t, p) in terms.chunks_mut(8).zip(p[..live].chunks(8)) {
        let mut x = [1f64; 8];
        for (x, &p) in x.iter_mut().zip(p) {
            *x = p + 1e-9;
        }
        let ln = numerics::ln_lanes(x);
        for i in 0..t.len() {
            t[i] = if p[i] == 0.0 { 0.0 } else { p[i] * ln[i] };
        }
    }
    let entropy = -numerics::lane_sum(live, |j| terms[j]);
    let key = if prev.is_some() { &p[..lim] } else { &logit[..lim] };
    let UnitOut { logits, scores, ranked } = out;
    rules::rank_row(key, ranking, ranked);
    logits.iter_mut().zip(logit).for_each(|(o, &x)| *o = x as f32);
    if let Some(masked) = logits.get_mut(lim..) {
        masked.fill(f32::NEG_INFINITY); // blocks past the causal limit
    }
    scores.iter_mut().zip(p.iter()).for_each(|(o, &x)| *o = x as f32);
    entropy
}

/// `units` rows of `width` elements of `buf` (all empty when `buf` is).
fn rows_of<T>(buf: &mut [T], units: usize, width: usize) -> Vec<&mut [T]> {
    if buf.is_empty() || width == 0 {
        return (0..units).map(|_| <&mut [T]>::default()).collect();
    }
    buf.chunks_mut(width).collect()
}

pub(crate) fn plan<E: Element>(isa: Isa, a: &PlanArgs<'_>) -> Result<Plan> {
    let d = a.dims();
    let dd = a.head_dim();
    let n = d.blocks;
    let (q, k) = (a.q(), a.k());
    let (qd, kd) = (q.typed::<E>().expect("dtype checked"), k.typed::<E>().expect("dtype checked"));

    // Representatives: per (b, segment) for queries, per (b, block) for keys.
    let mut qrep = alloc::grid("query representatives", &[d.batch, d.segments, d.q_heads, 2, dd], 0f64)?;
    qrep.par_chunks_mut(d.q_heads * 2 * dd).enumerate().for_each_init(Scratch::default, |scratch, (bs, out)| {
        let (b, s) = (bs / d.segments, bs % d.segments);
        let row_of = |t, h| &qd[q.offset(b, t, h)..][..dd];
        representatives::<E>(isa, row_of, d.segment_range(s), d.q_heads, dd, out, scratch)
    });
    // The keys' straight into the logit kernel's tiles: one pass, no `[B, N, Hkv, 2, D]` copy; a
    // task takes a tile's tokens of every kv head, which lie together in K.
    let bk = d.block_size;
    let span = Span::of_args(a);
    let kt = KeyTiles::build(&d, dd, |b, t, heads| {
        let blocks = t * TILE_KEYS..n.min((t + 1) * TILE_KEYS);
        let row_of = |t, h| &kd[k.offset(b, t, h)..][..dd];
        key_tile::<E>(isa, row_of, blocks, bk, dd, span.precision, heads)
    })?;
    plan_span_tiles(isa, &span, &qrep, &kt, None)
}

/// What planning decides over, wherever the representatives came from.
pub(crate) struct Span<'a> {
    pub dims: PlanDims,
    pub cfg: &'a EntropyConfig,
    pub head_dim: usize,
    pub keep_maps: bool,
    /// Rank as far as any budget can reach (tensor-parallel shards, SPEC §7.7).
    pub full_ranking: bool,
    pub fusion: Option<&'a [f32]>,
    /// The segments planned: all for a one-shot plan, a chunk's (SPEC §7.2).
    pub segments: std::ops::Range<usize>,
    /// The logits' dot products: the inputs' dtype's (`numerics::LogitPrecision::of`).
    pub precision: LogitPrecision,
}

impl<'a> Span<'a> {
    /// The span of a one-shot planning call: every segment.
    pub fn of_args(a: &PlanArgs<'a>) -> Self {
        Span {
            dims: a.dims(),
            cfg: a.cfg(),
            head_dim: a.head_dim(),
            keep_maps: a.keep_maps(),
            full_ranking: a.full_ranking(),
            fusion: a.fusion(),
            segments: 0..a.dims().segments,
            precision: LogitPrecision::of(a.q().dtype()),
        }
    }

    /// The span of one sequence's chunk of a chunked planning call on inputs of `dtype`.
    pub fn of_chunk(settings: &ChunkSettings, sc: &SeqChunk<'a>, dtype: DType) -> Self {
        Span {
            dims: sc.dims,
            cfg: sc.cfg,
            head_dim: settings.head_dim,
            keep_maps: settings.keep_maps,
            full_ranking: settings.full_ranking,
            fusion: sc.fusion,
            segments: sc.segments.clone(),
            precision: LogitPrecision::of(dtype),
        }
    }
}

/// The rest of planning from the representatives (`qrep` `[B, segments, Hq, 2, D]`, `krep`
/// `[B, blocks, Hkv, 2, D]`, max then min), in f64: shared by the CPU backend and by backends
/// whose devices compute the representatives (max/min are exact in any precision) but have no
/// f64 arithmetic for the decisions.
#[cfg(any(feature = "ascend", feature = "ascend-emu"))]
pub(crate) fn plan_from_representatives(isa: Isa, a: &PlanArgs<'_>, qrep: &[f64], krep: &[f64]) -> Result<Plan> {
    plan_span(isa, &Span::of_args(a), qrep, krep, None)
}

/// Planning of `span.segments` from their query representatives (`[B, planned, Hq, 2, D]`) and
/// the key representatives of every block before them. A one-shot span decides by the shared
/// rules; a chunk continues `states` (`[B, Hkv]`, `streaming` classes) and leaves them after its
/// last segment.
pub(crate) fn plan_span(
    isa: Isa,
    span: &Span<'_>,
    qrep: &[f64],
    krep: &[f64],
    states: Option<&mut [PlanState]>,
) -> Result<Plan> {
    plan_span_tiles(isa, span, qrep, &key_tiles(&span.dims, span.head_dim, krep, span.precision)?, states)
}

/// [`plan_span`] with the key representatives as the logit kernel's tiles ([`key_tiles`]).
fn plan_span_tiles(
    isa: Isa,
    span: &Span<'_>,
    qrep: &[f64],
    kt: &KeyTiles,
    states: Option<&mut [PlanState]>,
) -> Result<Plan> {
    let d = span.dims;
    let cfg = span.cfg;
    let dd = span.head_dim;
    let (first, planned) = (span.segments.start, span.segments.len());
    // The logits only need qmax + qmin (SPEC §2.2: both terms share the key representative).
    let qsum: Vec<f64> = qrep.chunks(2 * dd).flat_map(|hm| (0..dd).map(move |i| hm[i] + hm[dd + i])).collect();

    // Per-unit logits, distribution, entropy and ranking, ranked as far as any keep can reach
    // (the final width, max(segment_topk), is only known once every entropy is).
    let rank_width = d.rank_width(cfg.base_budget);
    let (units, n) = (d.units(), d.blocks);
    let map = alloc::count("a planning map [B, Hkv, nseg, N]", &[units, n])?;
    let keep_scores = span.keep_maps || cfg.layer_fusion;
    let mut logits = alloc::filled("the planning logits", if span.keep_maps { map } else { 0 }, 0f32)?;
    let mut scores = alloc::filled("the block distributions", if keep_scores { map } else { 0 }, 0f32)?;
    let mut ranked = alloc::grid("the block rankings", &[units, rank_width], 0u32)?;
    let outs = rows_of(&mut logits, units, n)
        .into_iter()
        .zip(rows_of(&mut scores, units, n))
        .zip(rows_of(&mut ranked, units, rank_width))
        .map(|((logits, scores), ranked)| UnitOut { logits, scores, ranked });
    // Planned units in groups of consecutive segments of one (b, kv head), ascending units.
    let mut groups: Vec<Vec<(usize, UnitOut)>> = Vec::new();
    for (u, out) in outs.enumerate().filter(|(u, _)| span.segments.contains(&(u % d.segments))) {
        match groups.last_mut() {
            Some(g) if g.len() < SEGMENTS_PER_TASK && g[0].0 / d.segments == u / d.segments => g.push((u, out)),
            _ => groups.push(vec![(u, out)]),
        }
    }
    let entropy64: Vec<f64> = groups
        .into_par_iter()
        .map_init(Vec::new, |logits, units| {
            dispatch(
                isa,
                GroupJob {
                    dims: d,
                    head_dim: dd,
                    qsum: &qsum,
                    first,
                    planned,
                    kt,
                    precision: span.precision,
                    prev: span.fusion,
                    units,
                    logits,
                },
            )
        })
        .collect::<Vec<_>>()
        .concat();

    let mut entropy = vec![0f32; units];
    for (bh, row) in entropy64.chunks(planned.max(1)).enumerate() {
        for (k, &e) in row.iter().enumerate() {
            entropy[bh * d.segments + first + k] = e as f32;
        }
    }
    let (head_class, budgets, keep_blocks, segment_topk) = match states {
        Some(states) if planned < d.segments => rules::decide_chunk(&d, cfg, &entropy, &span.segments, states),
        states => {
            let decided = rules::decide(&d, cfg, &entropy);
            if let Some(states) = states {
                rules::finish_states(&d, cfg, &entropy, &decided.0, states);
            }
            decided
        }
    };
    let width = if span.full_ranking { rank_width } else { rules::order_width(&segment_topk) };
    let mut order = alloc::with_capacity("the block rankings", alloc::count("the ranking", &[units, width])?)?;
    for row in rows_of(&mut ranked, units, rank_width) {
        order.extend_from_slice(&row[..width]);
    }
    drop(ranked);
    let mut plan = Plan {
        dims: d,
        logits,
        scores,
        entropy,
        head_class,
        budgets,
        keep_blocks,
        segment_topk,
        order,
        order_width: width,
        blocks: BlockLists::all_dense(d),
        planned: span.segments.clone(),
    };
    plan.blocks = plan.block_lists(cfg.budget_mode, cfg.threshold_len);
    Ok(plan)
}

/// Chunked planning over a cache (SPEC §7.2): per sequence, the representatives of its chunk's
/// segments (from its queries) and of every block before them (from the cache's pages), then
/// [`plan_span`] continuing the sequence's states.
pub(crate) fn plan_chunks<E: Element>(isa: Isa, a: &ChunkArgs<'_>, states: &mut [PlanState]) -> Result<Vec<Plan>> {
    let dd = a.head_dim();
    let q = a.q();
    let qd = q.typed::<E>().expect("dtype checked");
    let cache = a.cache();
    let kd = cache.k().typed::<E>().expect("dtype checked");
    let mut plans = Vec::with_capacity(a.seqs().len());
    for (i, sc) in a.seqs().iter().enumerate() {
        let d = sc.dims;
        let segs = sc.segments.clone();
        let mut qrep = alloc::grid("query representatives", &[segs.len(), d.q_heads, 2, dd], 0f64)?;
        qrep.par_chunks_mut(d.q_heads * 2 * dd).enumerate().for_each_init(Scratch::default, |scratch, (k, out)| {
            let positions = d.segment_range(segs.start + k);
            let token = |p: usize| sc.tokens.start + p - sc.q_start;
            let tokens = token(positions.start)..token(positions.end);
            let row_of = |t, h| &qd[q.offset(0, t, h)..][..dd];
            representatives::<E>(isa, row_of, tokens, d.q_heads, dd, out, scratch)
        });
        // Blocks any planned segment may select: those before its last segment.
        let blocks = if segs.is_empty() { 0 } else { d.causal_limit(segs.end - 1) };
        let mut krep = alloc::grid("key representatives", &[d.blocks, d.kv_heads, 2, dd], 0f64)?;
        if blocks > 0 {
            krep[..blocks * d.kv_heads * 2 * dd].par_chunks_mut(d.kv_heads * 2 * dd).enumerate().for_each_init(
                Scratch::default,
                |scratch, (j, out)| {
                    let bk = d.block_size;
                    let at = |t: usize, h: usize| &kd[cache.entry_offset(i, h, t)..][..dd];
                    representatives::<E>(isa, at, j * bk..(j + 1) * bk, d.kv_heads, dd, out, scratch)
                },
            );
        }
        let span = Span::of_chunk(&a.settings(), sc, E::DTYPE);
        let hkv = d.kv_heads;
        plans.push(plan_span(isa, &span, &qrep, &krep, Some(&mut states[i * hkv..(i + 1) * hkv]))?);
    }
    Ok(plans)
}

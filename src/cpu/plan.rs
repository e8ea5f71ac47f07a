//! Planning on the CPU (SPEC §2). Representatives are max/min in f32 (exact); logits, the
//! distribution and the entropy are computed in f64 with [`crate::numerics`]' operations and
//! summation orders, which the device kernels share bit for bit; budgets and keep counts use the
//! shared rules.

use rayon::prelude::*;

use super::simd::{Isa, Simd, WithSimd, dispatch};
use crate::alloc;
use crate::config::EntropyConfig;
use crate::engine::args::ChunkSettings;
use crate::engine::{ChunkArgs, SeqChunk};
use crate::error::Result;
use crate::numerics;
use crate::plan::{BlockLists, Plan, PlanDims, PlanState, rules};
use crate::tensor::Element;
use crate::validate::PlanArgs;

/// Element-wise max and min over `tokens` of every head: `[heads][2][D]` in f64 (max then min),
/// row `(t, h)` read by `row_of`.
fn representatives<'r, E: Element>(
    row_of: impl Fn(usize, usize) -> &'r [E],
    tokens: std::ops::Range<usize>,
    heads: usize,
    d: usize,
    out: &mut [f64],
    row: &mut [f32],
) {
    let mut mx = vec![f32::NEG_INFINITY; heads * d];
    let mut mn = vec![f32::INFINITY; heads * d];
    for t in tokens {
        for h in 0..heads {
            E::widen(row_of(t, h), row);
            let (a, c) = (&mut mx[h * d..(h + 1) * d], &mut mn[h * d..(h + 1) * d]);
            for i in 0..d {
                a[i] = a[i].max(row[i]);
                c[i] = c[i].min(row[i]);
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

/// Where unit (b, h, s) writes: its rows of the logit and score maps (empty when not kept) and
/// its ranking prefix. The maps grow as L², so they are allocated once, fallibly, by the caller.
struct UnitOut<'o> {
    logits: &'o mut [f32],
    scores: &'o mut [f32],
    ranked: &'o mut [u32],
}

struct UnitJob<'a, 'o> {
    dims: PlanDims,
    head_dim: usize,
    /// `[B][segments planned][Hq]` sums `qmax + qmin` (f64, exact).
    qsum: &'a [f64],
    /// The first segment planned and how many are.
    first: usize,
    planned: usize,
    /// `[B][N][Hkv][2][D]` key representatives.
    krep: &'a [f64],
    prev: Option<&'a [f32]>,
    b: usize,
    h: usize,
    s: usize,
    out: UnitOut<'o>,
}

impl WithSimd for UnitJob<'_, '_> {
    /// The unit's entropy.
    type Output = f64;
    #[inline(always)]
    fn with_simd<S: Simd>(self) -> f64 {
        let UnitJob { dims: d, head_dim: dd, qsum, krep, b, h, s, first, planned, .. } = self;
        let n = d.blocks;
        let g = d.group();
        let lim = d.causal_limit(s);
        let mut logit = vec![f64::NEG_INFINITY; n];
        for (j, x) in logit.iter_mut().enumerate().take(lim) {
            let kr = &krep[((b * n + j) * d.kv_heads + h) * 2 * dd..];
            let (kmax, kmin) = (&kr[..dd], &kr[dd..2 * dd]);
            let mut sum = 0.0;
            for gi in 0..g {
                let qs = &qsum[((b * planned + s - first) * d.q_heads + h * g + gi) * dd..][..dd];
                sum += 0.5 * numerics::dot(qs, kmax).max(numerics::dot(qs, kmin));
            }
            *x = sum / g as f64;
        }
        // numerics' exp, ln and summation order: the device kernels compute the same bits.
        let mut p = vec![0f64; n];
        if s == 0 {
            p.fill(1.0 / n as f64);
        } else {
            let m = logit[..lim].iter().copied().fold(f64::NEG_INFINITY, f64::max);
            for j in 0..lim {
                p[j] = numerics::exp(logit[j] - m);
            }
            let z = numerics::lane_sum(lim, |j| p[j]);
            p[..lim].iter_mut().for_each(|x| *x /= z);
        }
        if let Some(prev) = self.prev {
            let row = &prev[d.unit(b, h, s) * n..][..n];
            p.iter_mut().zip(row).for_each(|(x, &q)| *x = 0.25 * q as f64 + 0.75 * *x);
        }
        let entropy = -numerics::lane_sum(n, |j| p[j] * numerics::ln(p[j] + 1e-9));
        let key = if self.prev.is_some() { &p[..lim] } else { &logit[..lim] };
        let UnitOut { logits, scores, ranked } = self.out;
        rules::rank_row(key, &mut Vec::new(), ranked);
        logits.iter_mut().zip(&logit).for_each(|(o, &x)| *o = x as f32);
        scores.iter_mut().zip(&p).for_each(|(o, &x)| *o = x as f32);
        entropy
    }
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
    qrep.par_chunks_mut(d.q_heads * 2 * dd).enumerate().for_each_init(
        || vec![0f32; dd],
        |row, (bs, out)| {
            let (b, s) = (bs / d.segments, bs % d.segments);
            representatives::<E>(|t, h| &qd[q.offset(b, t, h)..][..dd], d.segment_range(s), d.q_heads, dd, out, row)
        },
    );
    let mut krep = alloc::grid("key representatives", &[d.batch, n, d.kv_heads, 2, dd], 0f64)?;
    if n > 0 {
        krep.par_chunks_mut(d.kv_heads * 2 * dd).enumerate().for_each_init(
            || vec![0f32; dd],
            |row, (bj, out)| {
                let (b, j) = (bj / n, bj % n);
                let bk = d.block_size;
                representatives::<E>(
                    |t, h| &kd[k.offset(b, t, h)..][..dd],
                    j * bk..(j + 1) * bk,
                    d.kv_heads,
                    dd,
                    out,
                    row,
                )
            },
        );
    }
    plan_from_representatives(isa, a, &qrep, &krep)
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
}

impl<'a> Span<'a> {
    /// The span of one sequence's chunk of a chunked planning call.
    pub fn of_chunk(settings: &ChunkSettings, sc: &SeqChunk<'a>) -> Self {
        Span {
            dims: sc.dims,
            cfg: sc.cfg,
            head_dim: settings.head_dim,
            keep_maps: settings.keep_maps,
            full_ranking: settings.full_ranking,
            fusion: sc.fusion,
            segments: sc.segments.clone(),
        }
    }
}

/// The rest of planning from the representatives (`qrep` `[B, segments, Hq, 2, D]`, `krep`
/// `[B, blocks, Hkv, 2, D]`, max then min), in f64: shared by the CPU backend and by backends
/// whose devices compute the representatives (max/min are exact in any precision) but have no
/// f64 arithmetic for the decisions.
pub(crate) fn plan_from_representatives(isa: Isa, a: &PlanArgs<'_>, qrep: &[f64], krep: &[f64]) -> Result<Plan> {
    let span = Span {
        dims: a.dims(),
        cfg: a.cfg(),
        head_dim: a.head_dim(),
        keep_maps: a.keep_maps(),
        full_ranking: a.full_ranking(),
        fusion: a.fusion(),
        segments: 0..a.dims().segments,
    };
    plan_span(isa, &span, qrep, krep, None)
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
    let entropy64: Vec<f64> = outs
        .enumerate()
        .filter(|(u, _)| span.segments.contains(&(u % d.segments)))
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|(u, out)| {
            let (bh, s) = (u / d.segments, u % d.segments);
            let (b, h) = (bh / d.kv_heads, bh % d.kv_heads);
            let job =
                UnitJob { dims: d, head_dim: dd, qsum: &qsum, first, planned, krep, prev: span.fusion, b, h, s, out };
            dispatch(isa, job)
        })
        .collect();

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
        qrep.par_chunks_mut(d.q_heads * 2 * dd).enumerate().for_each_init(
            || vec![0f32; dd],
            |row, (k, out)| {
                let positions = d.segment_range(segs.start + k);
                let token = |p: usize| sc.tokens.start + p - sc.q_start;
                let tokens = token(positions.start)..token(positions.end);
                representatives::<E>(|t, h| &qd[q.offset(0, t, h)..][..dd], tokens, d.q_heads, dd, out, row)
            },
        );
        // Blocks any planned segment may select: those before its last segment.
        let blocks = if segs.is_empty() { 0 } else { d.causal_limit(segs.end - 1) };
        let mut krep = alloc::grid("key representatives", &[d.blocks, d.kv_heads, 2, dd], 0f64)?;
        if blocks > 0 {
            krep[..blocks * d.kv_heads * 2 * dd].par_chunks_mut(d.kv_heads * 2 * dd).enumerate().for_each_init(
                || vec![0f32; dd],
                |row, (j, out)| {
                    let bk = d.block_size;
                    let at = |t: usize, h: usize| &kd[cache.entry_offset(i, h, t)..][..dd];
                    representatives::<E>(at, j * bk..(j + 1) * bk, d.kv_heads, dd, out, row)
                },
            );
        }
        let span = Span::of_chunk(&a.settings(), sc);
        let hkv = d.kv_heads;
        plans.push(plan_span(isa, &span, &qrep, &krep, Some(&mut states[i * hkv..(i + 1) * hkv]))?);
    }
    Ok(plans)
}

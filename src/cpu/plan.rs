//! Planning on the CPU (SPEC §2). Representatives are max/min in f32 (exact); logits, the
//! distribution and the entropy are computed in f64 with [`crate::numerics`]' operations and
//! summation orders, which the device kernels share bit for bit; budgets and keep counts use the
//! shared rules.

use rayon::prelude::*;

use super::simd::{Isa, Simd, WithSimd, dispatch};
use crate::alloc;
use crate::error::Result;
use crate::numerics;
use crate::plan::{BlockLists, Plan, PlanDims, rules};
use crate::tensor::{Element, TensorView};
use crate::validate::PlanArgs;

/// Element-wise max and min over `rows` consecutive tokens of every head: `[heads][2][D]` in f64
/// (max then min), from a BSND view.
fn representatives<E: Element>(
    x: &TensorView<'_>,
    b: usize,
    tokens: std::ops::Range<usize>,
    heads: usize,
    d: usize,
    out: &mut [f64],
    row: &mut [f32],
) {
    let data = x.typed::<E>().expect("dtype checked by validation");
    let mut mx = vec![f32::NEG_INFINITY; heads * d];
    let mut mn = vec![f32::INFINITY; heads * d];
    for t in tokens {
        for h in 0..heads {
            let o = x.offset(b, t, h);
            E::widen(&data[o..o + d], row);
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
    /// `[B][nseg][Hq]` sums `qmax + qmin` (f64, exact).
    qsum: &'a [f64],
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
        let UnitJob { dims: d, head_dim: dd, qsum, krep, b, h, s, .. } = self;
        let n = d.blocks;
        let g = d.group();
        let lim = d.causal_limit(s);
        let mut logit = vec![f64::NEG_INFINITY; n];
        for (j, x) in logit.iter_mut().enumerate().take(lim) {
            let kr = &krep[((b * n + j) * d.kv_heads + h) * 2 * dd..];
            let (kmax, kmin) = (&kr[..dd], &kr[dd..2 * dd]);
            let mut sum = 0.0;
            for gi in 0..g {
                let qs = &qsum[((b * d.segments + s) * d.q_heads + h * g + gi) * dd..][..dd];
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

    // Representatives: per (b, segment) for queries, per (b, block) for keys.
    let mut qrep = alloc::grid("query representatives", &[d.batch, d.segments, d.q_heads, 2, dd], 0f64)?;
    qrep.par_chunks_mut(d.q_heads * 2 * dd).enumerate().for_each_init(
        || vec![0f32; dd],
        |row, (bs, out)| {
            let (b, s) = (bs / d.segments, bs % d.segments);
            representatives::<E>(&q, b, d.segment_range(s), d.q_heads, dd, out, row)
        },
    );
    let mut krep = alloc::grid("key representatives", &[d.batch, n, d.kv_heads, 2, dd], 0f64)?;
    if n > 0 {
        krep.par_chunks_mut(d.kv_heads * 2 * dd).enumerate().for_each_init(
            || vec![0f32; dd],
            |row, (bj, out)| {
                let (b, j) = (bj / n, bj % n);
                let bk = d.block_size;
                representatives::<E>(&k, b, j * bk..(j + 1) * bk, d.kv_heads, dd, out, row)
            },
        );
    }
    plan_from_representatives(isa, a, &qrep, &krep)
}

/// The rest of planning from the representatives (`qrep` `[B, segments, Hq, 2, D]`, `krep`
/// `[B, blocks, Hkv, 2, D]`, max then min), in f64: shared by the CPU backend and by backends
/// whose devices compute the representatives (max/min are exact in any precision) but have no
/// f64 arithmetic for the decisions.
pub(crate) fn plan_from_representatives(isa: Isa, a: &PlanArgs<'_>, qrep: &[f64], krep: &[f64]) -> Result<Plan> {
    let d = a.dims();
    let cfg = a.cfg();
    let dd = a.head_dim();
    // The logits only need qmax + qmin (SPEC §2.2: both terms share the key representative).
    let qsum: Vec<f64> = qrep.chunks(2 * dd).flat_map(|hm| (0..dd).map(move |i| hm[i] + hm[dd + i])).collect();

    // Per-unit logits, distribution, entropy and ranking, ranked as far as any keep can reach
    // (the final width, max(segment_topk), is only known once every entropy is).
    let rank_width = d.rank_width(cfg.base_budget);
    let (units, n) = (d.units(), d.blocks);
    let map = alloc::count("a planning map [B, Hkv, nseg, N]", &[units, n])?;
    let keep_scores = a.keep_maps() || cfg.layer_fusion;
    let mut logits = alloc::filled("the planning logits", if a.keep_maps() { map } else { 0 }, 0f32)?;
    let mut scores = alloc::filled("the block distributions", if keep_scores { map } else { 0 }, 0f32)?;
    let mut ranked = alloc::grid("the block rankings", &[units, rank_width], 0u32)?;
    let outs = rows_of(&mut logits, units, n)
        .into_iter()
        .zip(rows_of(&mut scores, units, n))
        .zip(rows_of(&mut ranked, units, rank_width))
        .map(|((logits, scores), ranked)| UnitOut { logits, scores, ranked });
    let entropy64: Vec<f64> = outs
        .enumerate()
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|(u, out)| {
            let (bh, s) = (u / d.segments, u % d.segments);
            let (b, h) = (bh / d.kv_heads, bh % d.kv_heads);
            let job = UnitJob { dims: d, head_dim: dd, qsum: &qsum, krep, prev: a.fusion(), b, h, s, out };
            dispatch(isa, job)
        })
        .collect();

    let entropy: Vec<f32> = entropy64.iter().map(|&e| e as f32).collect();
    let (head_class, budgets, keep_blocks, segment_topk) = rules::decide(&d, cfg, &entropy);
    let width = rules::order_width(&segment_topk);
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
    };
    plan.blocks = plan.block_lists(cfg.budget_mode, cfg.threshold_len);
    Ok(plan)
}
